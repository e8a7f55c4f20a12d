"""Engine processes end with llmwarm, even when llmwarm is SIGKILLed: a real process tree."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from benchmarks.launch import ENGINE_FLAGS, LLMWARM, free_port
from llmwarm import lifeline
from tests.launch import (
    MINIMAL,
    STARTUP_TIMEOUT_S,
    Launch,
    engine_core,
    engine_env,
    engine_processes,
)

ROOT = Path(__file__).resolve().parent.parent


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@contextlib.contextmanager
def _tree(tmp_path: Path, method: str, armed: bool = True) -> Iterator[list[psutil.Process]]:
    """The parent running, with its child and grandchild: the processes under it. Whatever
    is left is killed on the way out."""
    # (run with -c, as `python -m llmwarm` runs: spawn has no main module of it to re-run)
    code = f"from tests.lifeline_tree import parent; parent({method!r}, armed={armed})"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(lifeline.ENV, None)
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True, cwd=tmp_path
    ) as parent:
        tree: list[psutil.Process] = []
        try:
            assert parent.stdout is not None
            grandchild = int(parent.stdout.readline())  # the whole tree runs
            tree = [psutil.Process(parent.pid), *psutil.Process(parent.pid).children(True)]
            # (spawn's resource tracker ends by itself once every process using it has)
            tree = [p for p in tree if "resource_tracker" not in " ".join(p.cmdline())]
            assert grandchild in {p.pid for p in tree} and len(tree) == 3
            yield tree
        finally:
            for process in reversed(tree):
                with contextlib.suppress(psutil.Error):
                    process.kill()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_sigkilled_parent_takes_its_engine_processes_along(method: str, tmp_path: Path) -> None:
    with _tree(tmp_path, method) as (parent, *engine):
        parent.kill()
        while not all(_gone(p.pid) for p in engine):  # (one left behind: the test's timeout)
            time.sleep(0.1)


def test_without_the_lifeline_an_engine_process_outlives_its_parent(tmp_path: Path) -> None:
    """The failure the lifeline fixes (as with plain vLLM): an orphan lives on."""
    with _tree(tmp_path, "fork", armed=False) as (parent, child, grandchild):
        parent.kill()
        time.sleep(2 * lifeline.POLL_S + lifeline.GRACE_S)
        assert not _gone(child.pid) and not _gone(grandchild.pid)


# --- end to end: llmwarm and a real vLLM engine -----------------------------------------------


def _until(what: str, check: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not check():
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.1)


def _phase(client: httpx.Client) -> str | None:
    try:
        return str(client.get("/live").json()["status"])
    except httpx.TransportError:
        return None


@pytest.mark.e2e
# (warming: its processes are ready's, the engine's and the warm-up client's, each watching
# llmwarm the same way; a SIGKILL while serving covers them)
@pytest.mark.parametrize("stage", ["loading", "ready"])
def test_a_sigkilled_llmwarm_leaves_no_engine_process(
    tiny_model: Path, tmp_path: Path, stage: str
) -> None:
    port, log = free_port(), tmp_path / "log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*LLMWARM, "serve", str(tiny_model), *ENGINE_FLAGS, "--port", str(port),
             "--profile", str(MINIMAL), "--report", str(tmp_path / "report.json")],
            stdout=out, stderr=subprocess.STDOUT, env=engine_env(), start_new_session=True,
        )  # fmt: skip
    launch = Launch.of(proc.pid)
    engine: list[psutil.Process] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            if stage == "loading":  # the engine's process exists, and is loading
                has_core = lambda: engine_core(engine_processes(launch)) is not None  # noqa: E731
                _until("an EngineCore", has_core, proc, log)
                assert _phase(client) in (None, "loading")
            else:
                _until(stage, lambda: _phase(client) == stage, proc, log)
        engine = engine_processes(launch)
        assert engine_core(engine), [p.pid for p in engine]
        proc.kill()
        proc.wait()
        while not all(_gone(p.pid) for p in engine):  # (one left behind: the test's timeout)
            time.sleep(0.1)
        assert "llmwarm lifeline" in log.read_text(errors="replace")
    finally:
        proc.kill()
        proc.wait()
        for process in engine:
            with contextlib.suppress(psutil.Error):
                process.kill()
