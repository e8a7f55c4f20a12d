"""llmwarm's Prometheus series, on the same `/metrics` as vLLM's (the default registry).

A collector reads the live state when scraped, so nothing is counted twice:

    llmwarm_phase{llmwarm_phase="loading|warming|ready|stopping"}   1 for the current phase
    llmwarm_engine_start_seconds                                    engine start to engine ready
    llmwarm_warmup_seconds                                          warm-up so far / in all
    llmwarm_warmup_requests                                         warm-up requests sent
    llmwarm_startup_seconds                                         since launch; once ready,
                                                                    the time to ready
    llmwarm_expected_ready_in_seconds                               predicted (0 when ready;
                                                                    absent: nothing to predict
                                                                    from: llmwarm.serve.startup)
    llmwarm_warmup_done_ratio                                       the buckets' share done
    llmwarm_warmups_total{trigger="startup|api|adapter",            warm-ups ended
                          outcome="converged|unconverged|failed"}
    llmwarm_write_failures_total{file="report|learn|caches"}        files not written, serving on
    llmwarm_bucket_rounds{bucket[,rank]}                            rounds run (rank: under
                                                                    data parallelism)
    llmwarm_bucket_converged{bucket}                                1 once converged
    llmwarm_bucket_warm_ttft_seconds{bucket}                        warm median TTFT
    llmwarm_bucket_warm_tpot_seconds{bucket}                        warm median TPOT
    llmwarm_jit_monitor_active                                      1 if vLLM's JIT monitor runs
    llmwarm_jit_events{phase="warmup|serving|rewarm"}               its compiles and autotuning
                                                                    runs: caught / missed
    llmwarm_requests_total{covered="true|false"}                    user requests the warm-up
                                                                    covered / did not
    llmwarm_cold_miss_ratio{kind}                                   an uncovered kind's first
                                                                    request over its later ones
                                                                    (at most 100 kinds, then
                                                                    "other")
    llmwarm_requests_untracked_total{reason}                        requests whose shape was
                                                                    not kept (a cap, a body)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, get_args

from prometheus_client import REGISTRY
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

from llmwarm.model.report import Trigger
from llmwarm.serve import startup
from llmwarm.serve.state import Phase, RunState
from llmwarm.warmup.progress import WarmupProgress

if TYPE_CHECKING:
    from llmwarm.model.report import JitEvents
    from llmwarm.traffic.coverage import Coverage


class WarmupCollector(Collector):
    def __init__(self, state: RunState) -> None:
        self.state = state

    def collect(self) -> Iterable[Metric]:
        state = self.state
        yield StateSetMetricFamily(
            "llmwarm_phase",
            "The llmwarm phase this server is in.",
            value={phase.value: phase is state.phase for phase in Phase},
        )
        yield from _warmup(state)
        yield from _startup(state)
        yield from _buckets(state.warmup)
        if state.jit is not None:
            yield from _jit(state.jit)
        yield from _coverage(state.coverage)


def _warmup(state: RunState) -> Iterable[Metric]:
    ended = CounterMetricFamily(
        "llmwarm_warmups",
        "Warm-ups ended, by trigger (startup; api: a re-warm; adapter: a LoRA adapter loaded at "
        "run time) and outcome (converged, "
        "unconverged, failed).",
        labels=["trigger", "outcome"],
    )
    for trigger in get_args(Trigger):
        for outcome in ("converged", "unconverged", "failed"):
            ended.add_metric([trigger, outcome], state.warmups[(trigger, outcome)])
    yield ended
    failures = CounterMetricFamily(
        "llmwarm_write_failures",
        "Files a serving process could not write (a full disk, a lost mount), by what: the "
        "report, the learn file, the compile caches it publishes; it serves on.",
        labels=["file"],
    )
    for file in ("report", "learn", "caches"):
        failures.add_metric([file], state.write_failures[file])
    yield failures
    if state.engine_start_s is not None:
        yield GaugeMetricFamily(
            "llmwarm_engine_start_seconds",
            "Seconds from engine start to engine ready.",
            value=state.engine_start_s,
        )
    elapsed = state.warmup.elapsed()
    if elapsed is not None:
        yield GaugeMetricFamily(
            "llmwarm_warmup_seconds", "Seconds of warm-up, so far or in all.", value=elapsed
        )
        yield GaugeMetricFamily(
            "llmwarm_warmup_requests", "Warm-up requests sent.", value=state.warmup.requests
        )


def _startup(state: RunState) -> Iterable[Metric]:
    """The start's time to ready, for an autoscaler (`llmwarm.serve.startup`)."""
    now = time.perf_counter()
    status = startup.status(state, now)
    yield GaugeMetricFamily(
        "llmwarm_startup_seconds",
        "Seconds since the process started until it was first ready; then its time to ready.",
        value=state.ready_s if state.ready_s is not None else now - state.started,
    )
    if status["expected_ready_in_s"] is not None:
        yield GaugeMetricFamily(
            "llmwarm_expected_ready_in_seconds",
            "Predicted seconds until ready (0 when ready), from this replica's last start "
            "(its report, or the bake's manifest) and the progress so far; absent when "
            "there is nothing to predict from.",
            value=status["expected_ready_in_s"],
        )
    if status.get("warmup_done") is not None:
        yield GaugeMetricFamily(
            "llmwarm_warmup_done_ratio",
            "The share of the warm-up's buckets done (1 when ready).",
            value=status["warmup_done"],
        )


def _buckets(live: WarmupProgress) -> Iterable[Metric]:
    buckets = list(live.buckets.values())
    # under data parallelism `rank` too: the rank (vLLM's `engine` label) the bucket ran on
    ranked = any(b.rank is not None for b in buckets)
    labels = ["bucket", "rank"] if ranked else ["bucket"]
    rounds = GaugeMetricFamily(
        "llmwarm_bucket_rounds", "Warm-up rounds run per bucket.", labels=labels
    )
    converged = GaugeMetricFamily(
        "llmwarm_bucket_converged", "1 once a bucket's latency converged.", labels=labels
    )
    ttft = GaugeMetricFamily(
        "llmwarm_bucket_warm_ttft_seconds",
        "Warm median time to first token per bucket.",
        labels=labels,
    )
    tpot = GaugeMetricFamily(
        "llmwarm_bucket_warm_tpot_seconds",
        "Warm median time per output token per bucket.",
        labels=labels,
    )
    for bucket in buckets:
        values = [bucket.name, str(bucket.rank)] if ranked else [bucket.name]
        rounds.add_metric(values, len(bucket.rounds))
        converged.add_metric(values, 1.0 if bucket.converged else 0.0)
        for family, metric in ((ttft, "ttft"), (tpot, "tpot")):
            value = bucket.warm(metric, live.window)
            if value is not None:
                family.add_metric(values, value)
    yield from (rounds, converged, ttft, tpot)


def _jit(jit: JitEvents) -> Iterable[Metric]:
    yield GaugeMetricFamily(
        "llmwarm_jit_monitor_active",
        "1 if vLLM's JIT monitor runs (GPU workers).",
        value=1.0 if jit.active else 0.0,
    )
    events = CounterMetricFamily(
        "llmwarm_jit_events",
        "vLLM JIT-monitor events by llmwarm phase: Triton, CuTe-DSL and TileLang kernel "
        "compiles (not FlashInfer or DeepGEMM builds, Inductor's kernels or Triton "
        "autotuning: 0 is not 'nothing compiled') during the warm-ups (caught), after the gate "
        "opened (missed) and during re-warms with the gate open (either's).",
        labels=["phase"],
    )
    events.add_metric(["warmup"], jit.warmup)
    events.add_metric(["serving"], jit.serving)
    events.add_metric(["rewarm"], jit.rewarm)
    yield events


def _coverage(coverage: Coverage) -> Iterable[Metric]:
    requests = CounterMetricFamily(
        "llmwarm_requests",
        "User requests to an endpoint, by whether the warm-ups covered their kind and shape "
        "(GET /warmup/coverage says why not).",
        labels=["covered"],
    )
    requests.add_metric(["true"], coverage.covered)
    requests.add_metric(["false"], coverage.uncovered)
    yield requests
    ratio = GaugeMetricFamily(
        "llmwarm_cold_miss_ratio",
        "Per uncovered request kind: its first request's latency (TTFT for streams, end to "
        "end otherwise) over the median of its later ones.",
        labels=["kind"],
    )
    for kind, value in coverage.ratios():
        ratio.add_metric([kind], value)
    yield ratio
    untracked = CounterMetricFamily(
        "llmwarm_requests_untracked",
        "User requests counted but whose shape was not kept: past the cap on distinct shapes "
        "(shapes_full), a body that could not be read (unreadable), a body with more structure "
        "to keep than 256 KiB (body_large), or one past 64 KiB of thousands of tiny strings (a "
        "quote every 8 bytes or fewer), read no further (body_dense).",
        labels=["reason"],
    )
    for reason in ("shapes_full", "unreadable", "body_large", "body_dense"):
        untracked.add_metric([reason], coverage.untracked[reason])
    yield untracked


@contextlib.contextmanager
def registered(collector: Collector) -> Iterator[None]:
    REGISTRY.register(collector)
    try:
        yield
    finally:
        REGISTRY.unregister(collector)
