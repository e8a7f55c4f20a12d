"""The lifecycle's guard against an engine dying during a warm-up, on a fake engine."""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass

import pytest

from llmwarm.errors import WarmupError
from llmwarm.server import _unless_engine_dies


@dataclass
class FakeEngine:
    errored: bool = False
    is_running: bool = True
    dead_error: BaseException = RuntimeError("EngineCore died")

    def die(self) -> None:
        self.errored, self.is_running = True, False


async def _endless(cancelled: asyncio.Event) -> int:
    """Work that never ends by itself; records that it was cancelled."""
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        cancelled.set()
        raise
    return 0


async def test_the_work_result_when_the_engine_lives() -> None:
    async def work() -> int:
        await asyncio.sleep(0.01)
        return 7

    assert await _unless_engine_dies(FakeEngine(), work()) == 7  # type: ignore[arg-type]


async def test_an_engine_death_cancels_the_work_and_says_so() -> None:
    eng = FakeEngine()
    cancelled = asyncio.Event()

    asyncio.get_running_loop().call_later(0.1, eng.die)
    with pytest.raises(WarmupError, match="the vLLM engine died during the warm-up") as info:
        await asyncio.wait_for(_unless_engine_dies(eng, _endless(cancelled)), 5)  # type: ignore[arg-type]
    assert cancelled.is_set()
    assert info.value.problems == [("engine", "EngineCore died")]


async def test_a_request_failing_because_the_engine_died_blames_the_engine() -> None:
    eng = FakeEngine()

    async def work() -> int:
        eng.die()
        raise WarmupError("warm-up request failed: HTTP 500")

    with pytest.raises(WarmupError, match="engine died"):
        await _unless_engine_dies(eng, work())  # type: ignore[arg-type]


async def test_a_request_failing_on_a_live_engine_is_that_failure() -> None:
    async def work() -> int:
        raise WarmupError("warm-up request failed: HTTP 400")

    with pytest.raises(WarmupError, match="HTTP 400"):
        await _unless_engine_dies(FakeEngine(), work())  # type: ignore[arg-type]


async def test_cancelling_the_guard_cancels_the_work() -> None:
    cancelled = asyncio.Event()

    guard = asyncio.create_task(_unless_engine_dies(FakeEngine(), _endless(cancelled)))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
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
        await _unless_engine_dies(eng, work())  # type: ignore[arg-type]
    gc.collect()
    await asyncio.sleep(0)
    assert "HTTP 500 beside the death" not in caplog.text  # no "exception never retrieved"
