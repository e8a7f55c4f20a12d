"""Where a start is, and when it will be ready: for autoscalers, load balancers and operators.

An autoscaler that takes "the pod is running" for "it can serve" scales again while replicas
are still loading (minutes for a large model); one that knows each replica's time to ready does
not. llmwarm knows its stages and its progress, and, from its last start, how long each took:

    loading   the engine starts (vLLM loads the weights, compiles, captures graphs: the stage
              the engine's worker last logged, `llmwarm.backend.loading`): expected ready in the
              last start's engine start less this one's so far, plus its warm-up
    warming   the KV-cache fill, the prefill sweep, then bucket by bucket: expected ready in the
              last warm-up's time less this one's so far; past it, or without a last start,
              this warm-up's time so far over the share of its buckets done
    ready     0

What an earlier start took (`Earlier`) comes from the report the last start wrote (`--report`)
or, without one, from the manifest of the bake in `--cache-dir` (its engine start was a cold
one: a start from the bake takes less). `expected_ready_in_s` is None, with the reason, when
there is nothing to predict from. `status` is pure: `now` and the state's times are on
`time.perf_counter()`'s clock.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmwarm.serve.state import Phase, RunState

if TYPE_CHECKING:
    from llmwarm.backend.caches import Manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Earlier:
    """What an earlier start took: its engine start and its warm-up, in seconds; and where
    that came from."""

    engine_start_s: float
    warmup_s: float | None
    source: str  # "the last start's report" or "the bake's manifest (a cold start)"


def earlier(report: Path | None, baked: Manifest | None) -> Earlier | None:
    """What the last start took: from its report (read leniently: a report of another
    version, or a damaged one, is skipped), else from the bake's manifest."""
    if report is not None:
        try:
            last = json.loads(report.read_text())
            start, warm = last["engine_start_s"], last["warmup_s"]
            if isinstance(start, (int, float)) and isinstance(warm, (int, float)):
                return Earlier(float(start), float(warm), f"the last start's report ({report})")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.debug("no earlier start in %s: %s", report, exc)
    if baked is not None:
        return Earlier(baked.engine_start_s, baked.warmup_s, "the bake's manifest (a cold start)")
    return None


def status(state: RunState, now: float) -> dict[str, Any]:
    """The start's stage and prediction, for `/startup`, the 503 bodies and `/metrics`."""
    phase, earlier = state.phase, state.earlier
    elapsed = now - state.started
    out: dict[str, Any] = {"phase": phase.value, "elapsed_s": round(elapsed, 1)}
    if phase is Phase.LOADING:
        loading = now - (state.engine_started or now)
        out["detail"] = state.loading or "the engine starts (vLLM's processes begin)"
        if state.loading_since is not None:
            out["detail_s"] = round(now - state.loading_since, 1)
        out["warmup_done"] = 0.0
        if earlier is None:
            return out | _unknown("no earlier start to predict from (no --report of one)")
        left = max(0.0, earlier.engine_start_s - loading)
        if earlier.warmup_s is None:  # a bake's manifest of an older llmwarm
            return out | _expected(left, f"{earlier.source}; its engine start only")
        return out | _expected(left + earlier.warmup_s, earlier.source)
    if phase is Phase.WARMING:
        live = state.warmup
        done = live.fraction()
        out["detail"] = _warming(live.where)
        out["warmup_done"] = round(done, 3)
        warm = live.seconds if live.seconds is not None else now - (live.started or now)
        if earlier is not None and earlier.warmup_s is not None and warm < earlier.warmup_s:
            return out | _expected(earlier.warmup_s - warm, earlier.source)
        if done > 0:
            return out | _expected(warm * (1 - done) / done, "this warm-up's progress")
        return out | _unknown("no earlier warm-up, and no bucket of this one done yet")
    out["ready_s"] = None if state.ready_s is None else round(state.ready_s, 1)
    if phase is Phase.READY:
        return out | {"warmup_done": 1.0} | _expected(0.0, "ready")
    return out | _unknown("stopping")


def _expected(seconds: float, source: str) -> dict[str, Any]:
    return {"expected_ready_in_s": round(seconds, 1), "expected_from": source}


def _unknown(why: str) -> dict[str, Any]:
    return {"expected_ready_in_s": None, "expected_from": why}


def _warming(where: dict[str, Any]) -> str:
    """What the warm-up is doing, in words: no bucket's name (`/startup` needs no key, and a
    profile's buckets are the operator's business; `/ready` with a key has them)."""
    if "kv_fill" in where:
        fill = where["kv_fill"]
        return f"filling the KV cache once ({fill['blocks']} of {fill['target']} blocks)"
    if "prefill" in where:
        return "the prefill sweep: a prompt of each prefill token count"
    if "bucket" in where:
        return f"warming bucket {where['bucket']} of {where['buckets']}, round {where['round']}"
    return "the warm-up begins"
