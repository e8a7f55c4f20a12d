"""The run state: what one process knows about itself, written by the lifecycle only.

The gate (`/ready`, 503s), the control endpoints (`/warmup/*`) and the metrics collector read
it; none of them writes it, but for one part: the gate records each user request it passes in
`coverage` (`llmwarm.traffic.coverage`), which the lifecycle resets to each warm-up.

Two clocks are kept apart on purpose:

    Stage   what the *process* is doing:  starting -> warming -> serving -> stopping
    Phase   what the *gate* answers:      loading  -> warming -> ready   -> stopping

They differ in one case: a re-warm with `close_gate` runs while the process is serving, and
the gate answers "warming" meanwhile. A signal then drains (the process serves) rather than
interrupting; the stage decides that, never the phase.
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil

from llmwarm.traffic.coverage import Coverage
from llmwarm.warmup.progress import WarmupProgress

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from llmwarm.model.report import JitEvents, Report
    from llmwarm.serve.startup import Earlier


class Stage(str, enum.Enum):
    STARTING = "starting"
    WARMING = "warming"
    SERVING = "serving"
    STOPPING = "stopping"


class Phase(str, enum.Enum):
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    STOPPING = "stopping"


def process_started() -> float:
    """When this process began, on `time.perf_counter()`'s clock: a replica's time to ready
    counts from its launch, Python's and vLLM's imports included (seconds here)."""
    age = time.time() - psutil.Process().create_time()
    return time.perf_counter() - max(0.0, age)


@dataclass
class Adapter:
    """A LoRA adapter loaded at run time (`llmwarm.serve.lora`): warming until its warm-up ends."""

    loaded: float  # time.perf_counter() at its load: asked (held), then answered by vLLM
    warm_s: float | None = None  # seconds from its load until let through
    failed: bool = False  # its warm-up failed: let through all the same

    @property
    def warming(self) -> bool:
        return self.warm_s is None


@dataclass
class RunState:
    """Everything the process's readers need, in one place."""

    window: int  # the serving profile's convergence window (for metrics before a warm-up)
    stage: Stage = Stage.STARTING
    # The start, on time.perf_counter()'s clock (`llmwarm.serve.startup`): the process's launch, the
    # engine's start, what the loading engine last said it does (`llmwarm.backend.loading`) and
    # since when; the seconds from launch to ready once ready; what an earlier start took.
    started: float = field(default_factory=process_started)
    engine_started: float | None = None
    loading: str | None = None
    loading_since: float | None = None
    ready_s: float | None = None
    earlier: Earlier | None = None
    gate_closed: bool = False  # a re-warm asked for the gate to close while it runs
    app: ASGIApp | None = None  # vLLM's app, once built
    engine_start_s: float | None = None
    report: Report | None = None  # the last warm-up's, failed or not
    jit: JitEvents | None = None  # vLLM's JIT-monitor events by phase, as last read
    # Live traffic against the last warm-up: the gate records each user request in it.
    coverage: Coverage = field(default_factory=Coverage)
    warmup: WarmupProgress = field(init=False)
    # Warm-ups ended, by (trigger, outcome): `converged`, `unconverged` or `failed`.
    warmups: Counter[tuple[str, str]] = field(default_factory=Counter)
    # Files a serving process could not write, by what: `report`, `learn`, `caches`.
    write_failures: Counter[str] = field(default_factory=Counter)
    # LoRA adapters loaded at run time, by name: the gate refuses a warming one's requests.
    adapters: dict[str, Adapter] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.warmup = WarmupProgress(self.window)

    @property
    def phase(self) -> Phase:
        if self.stage is Stage.STARTING:
            return Phase.LOADING
        if self.stage is Stage.WARMING or (self.stage is Stage.SERVING and self.gate_closed):
            return Phase.WARMING
        if self.stage is Stage.SERVING:
            return Phase.READY
        return Phase.STOPPING

    @property
    def summary(self) -> dict[str, Any]:
        """The last warm-up's short form, for `/ready`."""
        return self.report.summary() if self.report is not None else {}

    def warmup_ended(self, report: Report) -> None:
        """Count a finished warm-up (published or not: a failed re-warm is not); the JIT
        monitor's counts it read at its end."""
        if report.jit is not None:
            self.jit = report.jit
        outcome = "failed" if report.error else "converged" if report.converged else "unconverged"
        self.warmups[(report.trigger, outcome)] += 1

    # --- transitions, by the lifecycle -------------------------------------------------
    def warming(self, app: ASGIApp) -> None:
        self.app, self.stage = app, Stage.WARMING

    def engine_starting(self) -> None:
        self.engine_started = time.perf_counter()

    def engine_loading(self, stage: str) -> None:
        self.loading, self.loading_since = stage, time.perf_counter()

    def serving(self) -> None:
        self.stage = Stage.SERVING
        if self.ready_s is None:  # the first time the gate opens
            self.ready_s = time.perf_counter() - self.started

    def stopping(self) -> None:
        self.stage = Stage.STOPPING

    def begin_warmup(self, window: int) -> WarmupProgress:
        self.warmup = WarmupProgress(window, started=time.perf_counter())
        return self.warmup
