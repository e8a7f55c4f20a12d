from __future__ import annotations

import time

import httpx
from prometheus_client import CollectorRegistry, generate_latest

from llmwarm.gate import Gate
from llmwarm.metrics import Live, WarmupCollector, registered
from tests.test_report import _bucket


def _scrape(gate: Gate, live: Live) -> str:
    registry = CollectorRegistry()
    registry.register(WarmupCollector(gate, live))
    return generate_latest(registry).decode()


def test_phase_only_while_loading() -> None:
    text = _scrape(Gate(), Live(window=2))
    assert 'llmwarm_phase{llmwarm_phase="loading"} 1.0' in text
    assert 'llmwarm_phase{llmwarm_phase="ready"} 0.0' in text
    assert "llmwarm_warmup_seconds" not in text and "llmwarm_bucket_converged{" not in text


def test_warming_and_ready_series() -> None:
    gate = Gate()
    live = Live(window=2, engine_start_s=31.5, warmup_started=time.perf_counter() - 2)
    bucket = _bucket()
    live.buckets[bucket.name] = bucket
    live.requests = 6
    gate.warming(app=lambda *a: None)  # type: ignore[arg-type]
    text = _scrape(gate, live)
    assert 'llmwarm_phase{llmwarm_phase="warming"} 1.0' in text
    assert "llmwarm_engine_start_seconds 31.5" in text
    seconds = float(text.split("\nllmwarm_warmup_seconds ")[1].split()[0])
    assert seconds >= 2
    assert "llmwarm_warmup_requests 6.0" in text
    assert 'llmwarm_bucket_rounds{bucket="p4-c1-o8"} 3.0' in text
    assert 'llmwarm_bucket_converged{bucket="p4-c1-o8"} 1.0' in text
    assert 'llmwarm_bucket_warm_tpot_seconds{bucket="p4-c1-o8"} 0.015' in text
    assert 'llmwarm_bucket_warm_ttft_seconds{bucket="p4-c1-o8"} 0.1' in text
    live.warmup_s = 2.5
    gate.open({})
    text = _scrape(gate, live)
    assert 'llmwarm_phase{llmwarm_phase="ready"} 1.0' in text
    assert "llmwarm_warmup_seconds 2.5" in text


async def test_gate_serves_metrics_while_loading() -> None:
    gate = Gate()
    with registered(WarmupCollector(gate, Live(window=2))):
        transport = httpx.ASGITransport(app=gate, client=("203.0.113.9", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            r = await client.get("/metrics")
    assert r.status_code == 200
    assert 'llmwarm_phase{llmwarm_phase="loading"} 1.0' in r.text
