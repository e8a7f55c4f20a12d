"""Runs inside vLLM's worker processes: count vLLM's JIT-monitor events by llmwarm's phase.

vLLM 0.32 switches its JIT monitor on (GPU workers, `--jit-monitor-mode warn|error`) at the end
of its own start-up warm-up: from then on every monitored kernel compile or autotuning run
(Triton, CuTe-DSL, TileLang) goes through `vllm.utils.jit_monitor._handle_jit_event`, which
logs it as "during inference" (`warn`) or raises inside the worker (`error`). llmwarm's warm-up
comes after that point, so every kernel it compiles would be reported as a user-facing spike,
and with `error` the engine would die warming up.

`JitMonitorExtension` is given to vLLM as `--worker-extension-cls`; its methods are called
through `collective_rpc` (`llmwarm.backend.engine`). It wraps `_handle_jit_event` to count each
event by phase. While llmwarm warms (`warmup`), an event is counted and logged, never raised:
finding these compiles is what the warm-up is for. Once the gate opens (`serving`), the user's mode
applies unchanged. During a re-warm with the gate open (`rewarm`), users' requests run beside
the warm-up's and an event cannot tell whose it is: counted apart, never raised (the user's
`error` mode would kill the engine for a compile the re-warm asked for). The CPU worker has no
monitor: `events()` then says it is inactive.

What the monitor sees is what vLLM hooks: Triton kernel compiles, CuTe-DSL and TileLang
compiles. Triton autotuning is printed by vLLM, not reported through the hook; FlashInfer and
DeepGEMM JIT builds and Inductor's own kernels are not seen at all. A count of 0 says none of
those, not that nothing compiled.

Imports vLLM only when called, in the worker; nothing else of llmwarm runs there but the
forwarding of the worker's loading stages (`llmwarm.backend.loading`), installed on import.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from llmwarm.backend import loading

logger = logging.getLogger("llmwarm.backend.jitmon")
loading.in_worker()  # in vLLM's worker (the extension's import): its stages to llmwarm

QUALNAME = "llmwarm.backend.jitmon.JitMonitorExtension"
PHASES = ("warmup", "serving", "rewarm")

_phase = "warmup"
_counts = dict.fromkeys(PHASES, 0)
_original: Callable[..., None] | None = None


def _counted(*, backend: str, event: str, fn_name: str, detail: str | None = None) -> None:
    _counts[_phase] += 1
    if _phase == "warmup":
        logger.info("llmwarm warm-up caught %s %s: %s", backend, event, fn_name)
        return
    if _phase == "rewarm":
        logger.info("during an open-gate re-warm: %s %s: %s", backend, event, fn_name)
        return
    assert _original is not None
    _original(backend=backend, event=event, fn_name=fn_name, detail=detail)


def install() -> None:
    """Wrap the monitor's event handler (once per process)."""
    global _original
    from vllm.utils import jit_monitor

    if _original is None:
        _original = jit_monitor._handle_jit_event
        jit_monitor._handle_jit_event = _counted


def set_phase(phase: str) -> None:
    global _phase
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}")
    install()
    _phase = phase


def events() -> dict[str, Any]:
    """Whether the monitor runs in this process, its events so far by phase, and where the
    worker stands: ranks of one pipeline stage compile the same kernels (tensor parallel),
    different stages and data-parallel engines different ones."""
    from vllm.distributed import parallel_state
    from vllm.utils import jit_monitor

    try:
        stage = parallel_state.get_pp_group().rank_in_group
        engine = parallel_state.get_dp_group().rank_in_group
    except (AssertionError, AttributeError):  # no distributed state: one worker
        stage = engine = 0
    return {"active": jit_monitor.is_active(), **_counts, "stage": stage, "engine": engine}


class JitMonitorExtension:
    """Mixed into vLLM's worker class (`--worker-extension-cls`)."""

    def llmwarm_jit_phase(self, phase: str) -> None:
        set_phase(phase)

    def llmwarm_jit_events(self) -> dict[str, Any]:
        return events()
