"""Re-warms of a serving engine (`POST /warmup/run`, and each LoRA adapter loaded at run time:
`llmwarm.serve.lora`), with one owner for all their rules.

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
    cancelled one changes none of them, and its caller hears why;
  * an adapter's warm-up starts when vLLM has loaded it, waits for any warm-up running (one
    warm-up drives the engine at a time: each measures its latency), and is cancelled when
    the adapter is unloaded or loaded again, or the server stops. Its end lets the adapter's
    requests through, whatever the outcome.
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
from llmwarm.model.profile import Profile, load_profile, shipped, shipped_names
from llmwarm.serve.state import Adapter, RunState, Stage

if TYPE_CHECKING:
    from llmwarm.model.report import Report

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
# An adapter's warm-up: its name -> its report, failed or not; then its entry in the report.
WarmAdapter = Callable[[str], Awaitable["Report"]]
PublishAdapter = Callable[[str, "Report", float, float], Awaitable[None]]


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
        warm_adapter: WarmAdapter | None = None,
        publish_adapter: PublishAdapter | None = None,
    ) -> None:
        self.state = state
        self._warm, self._publish, self._jit_phase = warm, publish, jit_phase
        self._warm_adapter, self._publish_adapter = warm_adapter, publish_adapter
        self.served = served  # the profile being served, and where it came from
        self.min_interval = min_interval
        self._clock = clock
        self.task: asyncio.Task[Report] | None = None
        self._ended_at: float | None = None
        self._closed = False
        self._engine = asyncio.Lock()  # one warm-up drives the engine at a time
        self._adapters: dict[str, asyncio.Task[None]] = {}

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
        try:
            async with self._engine:  # (an adapter's warm-up may be running)
                report = await self._warming(
                    "warmup" if request.close_gate else "rewarm", self._warm(profile, source)
                )
            if report.error is None:
                await self._publish(report)
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

    async def _warming(self, phase: str, warm: Awaitable[Report]) -> Report:
        """A warm-up of the serving engine, vLLM's JIT monitor counting it as one meanwhile
        (gate open: users' requests run beside it, and a compile is either's)."""
        await self._jit_phase(phase)
        try:
            return await warm
        finally:
            if self.state.stage is Stage.SERVING:
                # from now on a compile is a user's spike again
                with contextlib.suppress(Exception):  # the engine died: serving ends anyway
                    await self._jit_phase("serving")

    # --- LoRA adapters loaded at run time (`llmwarm.serve.lora`) ----------------------------
    def adapter_loading(self, name: str) -> Adapter | None:
        """vLLM is loading `name`, new here: held (warming) from now, as vLLM serves it before
        it answers the load. What is held, for `adapter_refused`; None if nothing is."""
        if self._closed or self._warm_adapter is None or name in self.state.adapters:
            return None
        held = self.state.adapters[name] = Adapter(loaded=time.perf_counter())
        return held

    def adapter_refused(self, name: str, held: object) -> None:
        """vLLM refused the load `adapter_loading` held `name` for: it is let go."""
        if self.state.adapters.get(name) is held:
            del self.state.adapters[name]

    def adapter_loaded(self, name: str) -> None:
        """vLLM has loaded `name` (or reloaded its weights): warming until its warm-up ends."""
        if self._closed or self._warm_adapter is None:
            return
        if (running := self._adapters.pop(name, None)) is not None:
            running.cancel()  # loaded again in place: new weights, a new warm-up
        self.state.adapters[name] = Adapter(loaded=time.perf_counter())
        logger.info("LoRA adapter %r loaded: warming it; its requests wait (503)", name)
        task = asyncio.create_task(self._adapter(name, self.state.adapters[name]))
        self._adapters[name] = task

    async def adapter_unloading(self, name: str) -> None:
        """`name` is about to be unloaded: its warm-up ends first (none of its requests may
        meet an adapter gone)."""
        task = self._adapters.pop(name, None)
        self.state.adapters.pop(name, None)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            logger.info("LoRA adapter %r unloaded while warming: its warm-up cancelled", name)

    async def _adapter(self, name: str, adapter: Adapter) -> None:
        """An adapter's warm-up, then its requests let through; cancelled (unloaded, loaded
        again, the server stopping), it lets nothing through."""
        assert self._warm_adapter is not None and self._publish_adapter is not None
        try:
            async with self._engine:
                report = await self._warming("rewarm", self._warm_adapter(name))
            if report.error is not None:
                logger.error(
                    "LoRA adapter %r: its warm-up failed (%s); serving it cold",
                    name, report.error.message,
                )  # fmt: skip
                adapter.failed = True
            waited = time.perf_counter() - adapter.loaded
            await self._publish_adapter(name, report, adapter.loaded, waited)
        except Exception:
            logger.exception("LoRA adapter %r: its warm-up failed; serving it cold", name)
            adapter.failed = True
        # (no await from here: the adapter is let through in the step its task ends)
        if self._adapters.get(name) is asyncio.current_task():
            del self._adapters[name]
        adapter.warm_s = time.perf_counter() - adapter.loaded
        logger.info("LoRA adapter %r serves, %.1f s after its load", name, adapter.warm_s)

    async def close(self) -> None:
        """No re-warm starts from now on; those running (adapters' too) are cancelled (the
        server is stopping)."""
        self._closed = True
        running = [t for t in [self.task, *self._adapters.values()] if t is not None]
        for task in running:
            task.cancel()
        for task in running:
            with contextlib.suppress(BaseException):
                await task


def _log_failure(task: asyncio.Task[Report]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        message = exc.message if isinstance(exc, LlmwarmError) else repr(exc)
        logger.error("re-warm failed: %s", message)
