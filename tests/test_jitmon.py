"""llmwarm's counter inside vLLM's JIT monitor, at the vLLM-call level (in this process)."""

from __future__ import annotations

from typing import Any

import pytest

from llmwarm.backend import jitmon


@pytest.fixture
def monitor(monkeypatch: pytest.MonkeyPatch) -> Any:
    """vLLM's monitor, activated in `error` mode as a GPU worker would after its own warm-up;
    every module global restored afterwards."""
    from vllm.utils import jit_monitor

    for name in ("_active", "_mode", "_verbose", "_handle_jit_event"):
        monkeypatch.setattr(jit_monitor, name, getattr(jit_monitor, name))
    monkeypatch.setattr(jitmon, "_original", None)
    monkeypatch.setattr(jitmon, "_phase", "warmup")
    monkeypatch.setattr(jitmon, "_counts", dict.fromkeys(jitmon.PHASES, 0))
    jit_monitor.activate(mode="error")
    return jit_monitor


def test_a_compile_while_warming_is_counted_not_raised_then_the_users_mode_applies(
    monitor: Any,
) -> None:
    ext = jitmon.JitMonitorExtension()
    ext.llmwarm_jit_phase("warmup")
    # how vLLM's CuTe-DSL hook reports a compile: through the module's _handle_jit_event
    monitor._log_cutedsl_jit_compile("fused_moe_kernel")
    monitor._log_cutedsl_jit_compile("rms_norm_kernel")
    counts = {"active": True, "warmup": 2, "serving": 0, "rewarm": 0, "stage": 0, "engine": 0}
    assert ext.llmwarm_jit_events() == counts
    ext.llmwarm_jit_phase("serving")
    with pytest.raises(RuntimeError, match="during inference: fused_moe_kernel"):
        monitor._log_cutedsl_jit_compile("fused_moe_kernel")  # error mode: as vLLM does
    assert ext.llmwarm_jit_events() == {**counts, "serving": 1}


def test_during_an_open_gate_rewarm_a_compile_is_counted_apart_and_never_raised(
    monitor: Any,
) -> None:
    # The defect: an open-gate re-warm set the phase to warm-up, so users' compiles beside it
    # counted as caught, and `error` mode was silenced for them.
    ext = jitmon.JitMonitorExtension()
    ext.llmwarm_jit_phase("rewarm")
    monitor._log_cutedsl_jit_compile("fused_moe_kernel")  # a user's or the re-warm's
    events = ext.llmwarm_jit_events()
    assert (events["warmup"], events["serving"], events["rewarm"]) == (0, 0, 1)


def test_workers_combine_as_the_kernels_they_compile() -> None:
    # The defect: workers were combined with `max`, which undercounts pipeline stages (each
    # compiles its own layers' kernels) and data-parallel engines.
    from llmwarm.backend.engine import combined

    def worker(engine: int, stage: int, warmup: int) -> dict[str, Any]:
        return {"active": True, "warmup": warmup, "serving": 0, "stage": stage, "engine": engine}

    # two stages of two tensor-parallel ranks each, on two engines: ranks of a stage agree
    seen = [worker(e, s, 3 + s) for e in (0, 1) for s in (0, 1) for _ in range(2)]
    assert combined(seen).warmup == 2 * (3 + 4)


def test_an_unknown_phase_is_refused(monitor: Any) -> None:
    with pytest.raises(ValueError, match="unknown phase"):
        jitmon.set_phase("later")


def test_without_a_monitor_the_counts_say_inactive(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.utils import jit_monitor

    monkeypatch.setattr(jit_monitor, "_active", False)  # the CPU worker never activates it
    assert jitmon.events()["active"] is False


@pytest.mark.parametrize(
    ("flags", "given"),
    [
        ((), True),  # one node: every worker can load it
        (("--nnodes", "2", "--node-rank", "0", "--tensor-parallel-size", "2"), False),
        (("--distributed-executor-backend", "ray"), False),  # a Ray cluster spans nodes
        (("--data-parallel-size", "2"), True),  # both ranks here
        # ranks on --headless nodes, and a Ray data-parallel backend
        (("--data-parallel-size", "4", "--data-parallel-size-local", "2"), False),
        (("--data-parallel-size", "2", "--data-parallel-backend", "ray"), False),
        # one server per rank: its engine is on this node
        (
            (
                "--data-parallel-size",
                "4",
                "--data-parallel-size-local",
                "1",
                "--data-parallel-rank",
                "3",
            ),
            True,
        ),
        (("--worker-extension-cls", "my.Extension"), False),  # the user's own stays
    ],
)
def test_the_counter_is_given_only_where_every_worker_can_load_it(
    flags: tuple[str, ...], given: bool
) -> None:
    # The defect: it was injected on every worker; on a multi-node engine, nodes without
    # llmwarm installed failed to start where plain vLLM would.
    from llmwarm.backend import vllm_args

    args = vllm_args.parse_args(["fake/model", *flags], "test")
    before = args.worker_extension_cls
    assert vllm_args.count_jit_events(args) is given
    assert args.worker_extension_cls == (jitmon.QUALNAME if given else before)
