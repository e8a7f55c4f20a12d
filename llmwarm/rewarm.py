"""Re-warms of a serving engine (`POST /warmup/run`), with one owner for all their rules.

`Rewarms` is the only thing that starts, runs or stops a re-warm, and it holds every rule:

  * at most one at a time, and none at all before the server serves or once it stops
    (`close()`): the check and the start are one step, with nothing awaited between them;
  * at most one per `min_interval` seconds, counted from the end of the last;
  * the gate closed while it runs when asked (`close_gate`), and reopened whatever happens,
    as its very last step: a client that reads `/ready` 200 finds the re-warm over, its report
    published, and may start the next;
  * vLLM's JIT monitor counting as warm-up meanwhile, and back to `serving` afterwards;
  * only a warm-up that finished is published (its report, the report file, what coverage
    counts as warm: the union of every finished warm-up of this engine); a failed or
    cancelled one changes none of them, and its caller hears why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmwarm.errors import LlmwarmError, WarmupError
from llmwarm.profile import Profile, load_profile, shipped, shipped_names
from llmwarm.state import RunState, Stage

if TYPE_CHECKING:
    from llmwarm.report import Report

logger = logging.getLogger(__name__)


class RewarmRequest(BaseModel):
    """The body of `POST /warmup/run`."""

    model_config = ConfigDict(extra="forbid")

    profile: str | None = Field(
        default=None, description="A shipped profile name; default: the profile being served."
    )
    close_gate: bool = Field(
        default=False,
        description="Answer 503 to users (and /ready) while the re-warm runs, as at start-up.",
    )
    wait: bool = Field(default=True, description="Answer only when the re-warm is done.")

    @field_validator("profile")
    @classmethod
    def _shipped(cls, name: str | None) -> str | None:
        if name is not None and name not in shipped_names():
            raise ValueError(f"not a shipped profile (one of: {', '.join(shipped_names())})")
        return name


@dataclass(frozen=True)
class Refused(Exception):
    """Why a re-warm cannot start now: an HTTP status, a message, and when to try again."""

    status: int
    message: str
    retry_after: float | None = None


# One warm-up of the serving engine: (profile, where it came from) -> its report, failed or not.
Warm = Callable[[Profile, str], Awaitable["Report"]]
# Make a finished warm-up's report the one the server shows, writes and counts as warm.
Publish = Callable[["Report"], Awaitable[None]]
JitPhase = Callable[[str], Awaitable[None]]


class Rewarms:
    """The one owner of re-warms (see the module docstring)."""

    def __init__(
        self,
        state: RunState,
        warm: Warm,
        publish: Publish,
        jit_phase: JitPhase,
        served: tuple[Profile, str],
        min_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = state
        self._warm, self._publish, self._jit_phase = warm, publish, jit_phase
        self.served = served  # the profile being served, and where it came from
        self.min_interval = min_interval
        self._clock = clock
        self.task: asyncio.Task[Report] | None = None
        self._ended_at: float | None = None
        self._closed = False

    def start(self, request: RewarmRequest) -> asyncio.Task[Report]:
        """Start a re-warm now, or raise `Refused` saying why not (no await: the checks and
        the start are one step)."""
        if self._closed or self.state.stage is Stage.STOPPING:
            raise Refused(503, "the server is stopping", retry_after=5)
        if self.state.stage is not Stage.SERVING:
            raise Refused(503, "a re-warm can run once the server is ready", retry_after=5)
        if self.task is not None and not self.task.done():
            raise Refused(409, "a re-warm is already running")
        if self._ended_at is not None:
            wait = self._ended_at + self.min_interval - self._clock()
            if wait > 0:
                raise Refused(
                    429,
                    f"at most one re-warm every {self.min_interval:g} s (--rewarm-min-interval)",
                    retry_after=wait,
                )
        logger.info(
            "re-warm requested (profile %s, close_gate %s)", request.profile, request.close_gate
        )
        self.task = asyncio.create_task(self._run(request))
        self.task.add_done_callback(_log_failure)
        return self.task

    async def _run(self, request: RewarmRequest) -> Report:
        profile, source = self.served
        if request.profile is not None:
            path = shipped(request.profile)
            profile, source = load_profile(path), str(path)
        self.state.gate_closed = request.close_gate
        # gate open: users' requests run beside the warm-up's, and a compile is either's
        await self._jit_phase("warmup" if request.close_gate else "rewarm")
        try:
            report = await self._warm(profile, source)
            if report.error is None:
                await self._publish(report)
        finally:
            try:
                if self.state.stage is Stage.SERVING:
                    # from now on a compile is a user's spike again
                    with contextlib.suppress(Exception):  # the engine died: serving ends anyway
                        await self._jit_phase("serving")
            finally:
                # Nothing is awaited from here to the task's end: the gate reopens in the same
                # step as the task is done, so `/ready` 200 never shows a re-warm still running.
                self._ended_at = self._clock()
                self.state.gate_closed = False
        if report.error is not None:
            raise WarmupError(report.error.message, problems=report.error.problems)
        logger.info(
            "re-warm done: %d requests in %.1f s, converged %s",
            report.requests, report.warmup_s, report.converged,
        )  # fmt: skip
        return report

    async def close(self) -> None:
        """No re-warm starts from now on; one running is cancelled (the server is stopping)."""
        self._closed = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


def _log_failure(task: asyncio.Task[Report]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        message = exc.message if isinstance(exc, LlmwarmError) else repr(exc)
        logger.error("re-warm failed: %s", message)
