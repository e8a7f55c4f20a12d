"""Launching llmwarm for real, as the end-to-end tests do: the command, vLLM's flags and
environment on this machine (the benchmarks' own, `benchmarks.launch`, with what tests add),
waiting for readiness, and finding an engine's processes.

Shared by the e2e tests (through conftest.py's fixtures and directly).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

import benchmarks.launch
from benchmarks.launch import ENGINE_FLAGS, LLMWARM, ROOT, free_port
from llmwarm import lifeline

MINIMAL = ROOT / "llmwarm" / "configs" / "minimal.yaml"
# The engine the session's baked cache is for (`baked`), and every start from it: a cache is
# baked for one configuration.
BAKED_ENGINE = [*ENGINE_FLAGS, "--served-model-name", "tiny", "--max-num-seqs", "4"]
# Compiled once per configuration and run: vLLM's CPU build cannot load back the AOT artifacts
# it saves (llmwarm.backend.caches), so every start compiled its graph again (~20 s of each start
# here); its other compile cache loads (~5 s). Tests that use --cache-dir point these into
# their own directory.
COMPILE_CACHE = ROOT / ".cache" / "vllm-tests"


def engine_env(bind: bool = True) -> dict[str, str]:
    """The environment of a real llmwarm here. Under pytest-xdist (the e2e layer runs two at a
    time) each worker's engines get a core of their own (`bind`: unless the test sets its own
    core lists, or wants vLLM's `auto`) and a compile cache of their own (two processes
    compiling into one cache at once mixed files upstream, vllm-project/vllm#52413)."""
    env = benchmarks.launch.engine_env()
    worker = env.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
    env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    env.setdefault("VLLM_CACHE_ROOT", str(COMPILE_CACHE / (worker or "main")))
    if worker and bind:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(int(worker[2:]) % (os.cpu_count() or 1)))
    elif not bind:
        env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    return env


STARTUP_TIMEOUT_S = 400


@dataclasses.dataclass(frozen=True)
class Launch:
    """A launched llmwarm, as the tests find its engine's processes after it is gone."""

    pid: int  # llmwarm's
    session: int  # its session (a process keeps it, orphaned or not)
    at: float  # when the launched process started (psutil's clock)

    @classmethod
    def of(cls, launched: int, llmwarm: int | None = None) -> Launch:
        """Right after the launch. `llmwarm`: when it runs under the launched process."""
        return cls(llmwarm or launched, os.getsid(launched), psutil.Process(launched).create_time())


def engine_processes(launch: Launch) -> list[psutil.Process]:
    """Every live process llmwarm started for its engine, orphans too. They carry its pid in
    their environment (`llmwarm.lifeline`) until vLLM names them (`VLLM::EngineCore`,
    `VLLM::Worker…`): setproctitle writes over the environment /proc shows, so a named one is
    found by its name, in llmwarm's session, started since the launch. Spawn's resource
    tracker is left out (it ends by itself with its last user). Short-lived helpers (vLLM runs
    `lscpu` while loading) are among them while they run: to know the engine is there, look
    for `engine_core`."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if process.pid == launch.pid or process.status() == psutil.STATUS_ZOMBIE:
                continue
            command = " ".join(process.cmdline())
            if "resource_tracker" in command:
                continue
            named = (
                command.startswith("VLLM::")
                and os.getsid(process.pid) == launch.session
                and process.create_time() >= launch.at
            )
            if named or process.environ().get(lifeline.ENV) == str(launch.pid):
                found.append(process)
    return found


def engine_core(processes: list[psutil.Process]) -> psutil.Process | None:
    """The EngineCore among `processes`, once it has named itself (`VLLM::EngineCore`, the
    first thing vLLM's engine process does)."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in " ".join([process.name(), *process.cmdline()]):
                return process
    return None


def wait_ready(proc: subprocess.Popen[bytes], client: httpx.Client, log: Path) -> None:
    """Poll /ready until 200; fail with the log's tail if the process exits or never gets there."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            if client.get("/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass  # not bound yet (the CLI is still importing vLLM)
        time.sleep(0.2)
    pytest.fail(
        f"not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text(errors='replace')[-3000:]}"
    )


def launch_serve(
    model: Path, port: int, log: Path, *flags: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`llmwarm serve MODEL` on loopback `port` with the engine's flags and `flags`, its
    output to `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [*LLMWARM, "serve", str(model), *ENGINE_FLAGS, "--port", str(port),
             "--host", "127.0.0.1", *flags],
            stdout=out, stderr=subprocess.STDOUT, env=env or engine_env(),
            start_new_session=True,  # its engine's processes, found by its session alone
        )  # fmt: skip


@contextlib.contextmanager
def serving(
    model: Path, tmp_path: Path, *flags: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], httpx.Client, Path]]:
    """`llmwarm serve MODEL` with the minimal profile, until ready: the process, a client of it
    and its report path. SIGTERMed on exit; it must then end by itself with 0."""
    port = free_port()
    log, report = tmp_path / "log", tmp_path / "report.json"
    proc = launch_serve(
        model, port, log, "--served-model-name", "tiny", "--report", str(report),
        "--profile", str(MINIMAL), *flags, env=env,
    )  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            wait_ready(proc, client, log)
            yield proc, client, report
        proc.send_signal(signal.SIGTERM)
        assert proc.wait() == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
