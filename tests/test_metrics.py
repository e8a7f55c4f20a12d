from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry, generate_latest

from llmwarm.model.report import JitEvents, WarmupFailure
from llmwarm.serve.gate import Gate
from llmwarm.serve.metrics import WarmupCollector, registered
from llmwarm.serve.startup import Earlier
from llmwarm.serve.state import RunState
from llmwarm.warmup.progress import WarmupProgress
from tests.fakes import INNER, report
from tests.fakes import bucket as _bucket
from tests.fakes import shape as _shape


def _scrape(state: RunState) -> str:
    registry = CollectorRegistry()
    registry.register(WarmupCollector(state))
    return generate_latest(registry).decode()


def test_phase_only_while_loading() -> None:
    text = _scrape(RunState(window=2))
    assert 'llmwarm_phase{llmwarm_phase="loading"} 1.0' in text
    assert 'llmwarm_phase{llmwarm_phase="ready"} 0.0' in text
    assert "llmwarm_warmup_seconds" not in text and "llmwarm_bucket_converged{" not in text


def test_warming_and_ready_series() -> None:
    state = RunState(window=2, engine_start_s=31.5)
    live = state.warmup = WarmupProgress(window=2, started=time.perf_counter() - 2)
    bucket = _bucket()
    live.buckets[bucket.name] = bucket
    live.requests = 6
    state.warming(INNER)
    text = _scrape(state)
    assert 'llmwarm_phase{llmwarm_phase="warming"} 1.0' in text
    assert "llmwarm_engine_start_seconds 31.5" in text
    seconds = float(text.split("\nllmwarm_warmup_seconds ")[1].split()[0])
    assert seconds >= 2
    assert "llmwarm_warmup_requests 6.0" in text
    assert 'llmwarm_bucket_rounds{bucket="p4-c1-o8"} 3.0' in text
    assert 'llmwarm_bucket_converged{bucket="p4-c1-o8"} 1.0' in text
    assert 'llmwarm_bucket_warm_tpot_seconds{bucket="p4-c1-o8"} 0.015' in text
    assert 'llmwarm_bucket_warm_ttft_seconds{bucket="p4-c1-o8"} 0.1' in text
    live.seconds = 2.5
    state.serving()
    text = _scrape(state)
    assert 'llmwarm_phase{llmwarm_phase="ready"} 1.0' in text
    assert "llmwarm_warmup_seconds 2.5" in text


async def test_gate_serves_metrics_while_loading() -> None:
    state = RunState(window=2)
    gate = Gate(state)
    with registered(WarmupCollector(state)):
        transport = httpx.ASGITransport(app=gate, client=("203.0.113.9", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            r = await client.get("/metrics")
    assert r.status_code == 200
    assert 'llmwarm_phase{llmwarm_phase="loading"} 1.0' in r.text


def _exported(state: RunState) -> dict[str, set[str]]:
    """Every series the collector exports for `state`: sample names (and family names) with
    the label names each carries."""
    found: dict[str, set[str]] = {}
    for family in WarmupCollector(state).collect():
        found.setdefault(family.name, set())
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
            found[family.name].update(sample.labels)
    return found


# `llmwarm_name` and, where given, `{label="..."|...}` or `{label}` after it
_NAMED = re.compile(r"\b(llmwarm_[a-z_]+)(?:\{([^}]*)\})?")


def _documented() -> list[tuple[str, str, set[str]]]:
    """(file, metric, labels) for every llmwarm metric the docs name."""
    root = Path(__file__).resolve().parent.parent
    pages = [root / "README.md", *sorted((root / "docs").rglob("*.md")),
             *sorted((root / "deploy").rglob("*.md"))]  # fmt: skip
    named = []
    for page in pages:
        for metric, labels in _NAMED.findall(page.read_text()):
            # (a PromQL matcher: =, !=, =~, !~; `job` and `instance` are the scrape's labels)
            keys = {re.split("[!=~]", part)[0].strip() for part in labels.split(",")}
            named.append((page.name, metric, keys - {"", "job", "instance"}))
    return named


def test_every_metric_and_label_the_docs_name_is_exported() -> None:
    # The defect: the README documented `llmwarm_cold_miss_ratio{shape}`; the label is `kind`.

    state = RunState(window=2, engine_start_s=30.0)
    state.earlier = Earlier(30.0, 10.0, "the last start's report")  # a prediction to export
    state.warmup = WarmupProgress(window=2, started=time.perf_counter() - 2)
    ranked = _bucket().model_copy(update={"rank": 0})  # `rank`: under data parallelism
    state.warmup.buckets[ranked.key] = ranked
    state.report = report()
    state.jit = JitEvents(active=True, warmup=3, serving=0)
    shape = _shape("chat-stream+penalties", 512, 1, 16)
    state.coverage.record(shape, 0.2)
    state.coverage.record(shape, 0.1)
    exported = _exported(state)
    documented = _documented()
    assert len(documented) > 10  # the docs do name them
    for page, metric, labels in documented:
        assert metric in exported, f"{page} names {metric}, which /metrics does not export"
        assert labels <= exported[metric], f"{page}: {metric} has no label {labels}"


def test_under_data_parallelism_each_bucket_has_a_series_per_rank() -> None:
    state = RunState(window=2, engine_start_s=31.5)
    live = state.warmup = WarmupProgress(window=2, started=time.perf_counter() - 2)
    for rank in (0, 1):
        ranked = _bucket().model_copy(update={"rank": rank})
        live.buckets[ranked.key] = ranked
    state.warming(INNER)
    text = _scrape(state)
    for rank in (0, 1):
        assert f'llmwarm_bucket_converged{{bucket="p4-c1-o8",rank="{rank}"}} 1.0' in text
        assert f'llmwarm_bucket_warm_ttft_seconds{{bucket="p4-c1-o8",rank="{rank}"}} 0.1' in text


def test_warmups_are_counted_by_trigger_and_outcome_from_the_start() -> None:
    state = RunState(window=2)
    text = _scrape(state)
    # every series there from the first scrape: an alert on a rise needs a zero before it
    for trigger in ("startup", "api"):
        for outcome in ("converged", "unconverged", "failed"):
            assert f'llmwarm_warmups_total{{outcome="{outcome}",trigger="{trigger}"}} 0.0' in text
    state.warmup_ended(report())
    unconverged = report(_bucket(converged_at=None)).model_copy(update={"trigger": "api"})
    state.warmup_ended(unconverged)
    failed = unconverged.model_copy(
        update={"error": WarmupFailure(message="the vLLM engine died", problems=[])}
    )
    state.warmup_ended(failed)
    text = _scrape(state)
    assert 'llmwarm_warmups_total{outcome="converged",trigger="startup"} 1.0' in text
    assert 'llmwarm_warmups_total{outcome="unconverged",trigger="api"} 1.0' in text
    assert 'llmwarm_warmups_total{outcome="failed",trigger="api"} 1.0' in text
