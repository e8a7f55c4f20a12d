"""Signals at any instant of a real start-up, and to a whole process group, on real vLLM.

Whatever the instant (while vLLM imports, at the hand-over from the import-time handler to the
event loop's, while the engine thread spawns EngineCore, at each stage of loading), a SIGTERM
or SIGINT ends llmwarm there, with 130 before serving and 0 (drained) while serving, and no
process of its engine is left. A SIGTERM to llmwarm's process group (`timeout`, `kill --
-PGID`) while serving is one request to stop: in-flight requests drain. (Warming: tests/
test_e2e.py.) No assertion here bounds a duration: each waits for the event it needs, and a
process that never ends fails by the test's timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from benchmarks.launch import ENGINE_FLAGS, LLMWARM, free_port
from llmwarm.backend import engine
from tests.launch import (
    MINIMAL,
    STARTUP_TIMEOUT_S,
    Launch,
    engine_env,
    engine_processes,
    wait_ready,
)

pytestmark = pytest.mark.e2e

# Seconds after launch, while Python starts, llmwarm imports vLLM, and the event loop takes
# over (the hand-over): cheap instants, whatever they hit on a loaded host (the assertions
# hold at any instant). The stages after them are reached by their events instead
# (`STAGES`): a fixed delay would land in a different one on a slower host.
DELAYS = [0.3, 0.6, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]


class Launched:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path, port: int) -> None:
        self.proc, self.log, self.port = proc, log, port
        self.launch = Launch.of(proc.pid)

    @property
    def text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def _launched(
    tiny_model: Path, tmp_path: Path, *extra: str, env: dict[str, str] | None = None,
    prefix: tuple[str, ...] = (),
) -> Iterator[Launched]:  # fmt: skip
    port, log = free_port(), tmp_path / "log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*prefix, *LLMWARM, "serve", str(tiny_model), *ENGINE_FLAGS, "--port", str(port),
             "--profile", str(MINIMAL), "--report", str(tmp_path / "report.json"), *extra],
            stdout=out, stderr=subprocess.STDOUT, env=engine_env() | (env or {}),
            start_new_session=True,  # its engine's processes, found by its session alone
        )  # fmt: skip
    launched = Launched(proc, log, port)
    try:
        yield launched
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for process in engine_processes(launched.launch):
            with contextlib.suppress(psutil.Error):
                process.kill()


def _ends(run: Launched, signalled: str) -> int:
    """llmwarm's exit code, once it and every process of its engine are gone (a process left
    behind: the test's timeout). `signalled`: its log when the signal was sent. A signal before
    the gate opened never lets it open (an interrupted start never serves)."""
    code = run.proc.wait()
    while engine_processes(run.launch):
        time.sleep(0.1)
    assert "Traceback" not in run.text, run.text[-3000:]
    if "warm: serving on" not in signalled:
        assert "warm: serving on" not in run.text, run.text[-3000:]
    return code


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has a handler for `sig` (its SigCgt mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False


def _until(run: Launched, what: str, reached: Callable[[], bool]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S  # a hang guard with the log's tail
    while not reached():
        assert run.proc.poll() is None, run.text[-3000:]
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.02)


def _until_in_log(run: Launched, marker: str) -> None:
    _until(run, f"logged {marker!r}", lambda: marker in run.text)


def _named(run: Launched, name: str) -> bool:
    for process in engine_processes(run.launch):
        try:  # (a short-lived child, a compiler say, may be gone by now)
            command = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if name in command:
            return True
    return False


# The stages of loading, by what shows them: vLLM's EngineCore process has named itself; its
# worker has; the worker compiles the model's graph. Each is seconds before the engine has
# loaded (`init engine ... took`), so a signal there finds it loading.
STAGES: dict[str, Callable[[Launched], bool]] = {
    "engine-core": lambda run: _named(run, "EngineCore"),
    "worker": lambda run: _named(run, "Worker"),
    "compiling": lambda run: "Warming up model for the compilation" in run.text,
}


@pytest.mark.parametrize("delay", DELAYS)
def test_a_sigterm_at_any_instant_of_start_up_ends_it_all(
    tiny_model: Path, tmp_path: Path, delay: float
) -> None:
    with _launched(tiny_model, tmp_path) as run:
        time.sleep(delay)
        assert run.proc.poll() is None, run.text[-3000:]
        # before Python has run llmwarm's first lines (a few tenths of a second), SIGTERM's
        # default applies: the process ends at once, nothing started
        early = not _catches(run.proc.pid, signal.SIGTERM)
        signalled = run.text
        run.proc.send_signal(signal.SIGTERM)
        code = _ends(run, signalled)
        # the stage decides: serving drains (0); anything before is interrupted (130)
        expected = 0 if "warm: serving on" in run.text else 130
        assert code == expected or (early and code == -signal.SIGTERM), run.text[-2000:]


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_sigterm_while_the_engine_loads_interrupts_it_there(
    tiny_model: Path, tmp_path: Path, stage: str
) -> None:
    with _launched(tiny_model, tmp_path) as run:
        _until(run, stage, lambda: STAGES[stage](run))
        signalled = run.text
        run.proc.send_signal(signal.SIGTERM)
        assert _ends(run, signalled) == 130
        # ended there, not once the engine had loaded (vLLM ignores SIGTERM while loading:
        # llmwarm ends its processes itself)
        assert "interrupted while loading" in run.text, run.text[-3000:]
        assert "init engine" not in run.text and "engine started in" not in run.text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("point", ["handover", "spawn"])
def test_a_signal_at_the_hand_over_or_the_engine_spawn_interrupts(
    tiny_model: Path, tmp_path: Path, point: str, sig: signal.Signals
) -> None:
    # handover: the event loop runs, its handlers are not in yet; spawn: the engine thread is
    # about to start EngineCore (a test hook pauses there 5 s)
    with _launched(tiny_model, tmp_path, env={engine.PAUSE_ENV: point}) as run:
        _until_in_log(run, f"llmwarm: paused at {point}")
        signalled = run.text
        run.proc.send_signal(sig)
        assert _ends(run, signalled) == 130


def _stream_in_flight(port: int, result: list[httpx.Response | BaseException]) -> threading.Event:
    """A long streamed request; the event is set once its first token came (it is in flight)."""
    first = threading.Event()
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 400, "ignore_eos": True,
            "stream": True}  # fmt: skip

    def run() -> None:
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                with client.stream("POST", "/v1/completions", json=body) as answer:
                    lines = []
                    for line in answer.iter_lines():
                        lines.append(line)
                        first.set()
                    answer.lines = lines  # type: ignore[attr-defined]
                    result.append(answer)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            result.append(exc)
            first.set()

    threading.Thread(target=run, daemon=True).start()
    return first


@pytest.mark.parametrize("how", ["timeout", "kill-pgid"])
def test_a_sigterm_to_the_process_group_while_serving_drains(
    tiny_model: Path, tmp_path: Path, how: str
) -> None:
    # GNU timeout, signalled (as at its expiry), sends SIGTERM to llmwarm and then to the whole
    # process group, as `kill -- -PGID` and systemd's KillMode=control-group do
    prefix = ("timeout", "-s", "TERM", "3600") if how == "timeout" else ()
    with _launched(
        tiny_model, tmp_path, "--served-model-name", "tiny", "--shutdown-timeout", "60",
        prefix=prefix,
    ) as run:  # fmt: skip
        llmwarm = psutil.Process(run.proc.pid)
        if how == "timeout":
            while not llmwarm.children():
                time.sleep(0.05)
            llmwarm = llmwarm.children()[0]
            run.launch = Launch.of(run.proc.pid, llmwarm.pid)  # its engine's processes know it
        with httpx.Client(base_url=f"http://127.0.0.1:{run.port}", timeout=30) as client:
            wait_ready(run.proc, client, run.log)
        result: list[httpx.Response | BaseException] = []
        _stream_in_flight(run.port, result).wait()
        if how == "timeout":
            run.proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(run.proc.pid, signal.SIGTERM)
        code = run.proc.wait()
        assert not llmwarm.is_running() or llmwarm.status() == psutil.STATUS_ZOMBIE
        # one request to stop, drained: the in-flight stream got all its tokens
        [answer] = result
        assert isinstance(answer, httpx.Response) and answer.status_code == 200, answer
        assert "data: [DONE]" in answer.lines  # type: ignore[attr-defined]
        assert "forcing exit" not in run.text, run.text[-3000:]
        assert "SIGTERM received" in run.text
        if how == "kill-pgid":
            assert code == 0
        while engine_processes(run.launch):  # each ends (one left: the test's timeout)
            time.sleep(0.1)
