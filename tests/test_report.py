from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from llmwarm.report import BucketResult, Report, RoundResult, Sample, table, write_json


def _sample(kind: str, e2e: float, ttft: float | None = None, tpot: float | None = None) -> Sample:
    return Sample(kind=kind, ttft_s=ttft, tpot_s=tpot, e2e_s=e2e, prompt_tokens=4, output_tokens=8)


def _bucket() -> BucketResult:
    return BucketResult(
        name="p4-c1-o8",
        prompt_tokens=4,
        concurrency=1,
        max_tokens=8,
        rounds=[
            RoundResult(round=1, samples=[_sample("c-stream", 0.9, 0.5, 0.05), _sample("c", 0.7)]),
            RoundResult(round=2, samples=[_sample("c-stream", 0.2, 0.1, 0.02), _sample("c", 0.3)]),
            RoundResult(round=3, samples=[_sample("c-stream", 0.1, 0.1, 0.01), _sample("c", 0.1)]),
        ],
    )


def _report() -> Report:
    return Report(
        llmwarm_version="0.1.0",
        vllm_version="0.32.0",
        model="tiny",
        profile="configs/default.yaml",
        started_at=datetime(2026, 11, 28, tzinfo=timezone.utc),
        engine_start_s=30.0,
        warmup_s=2.5,
        requests=6,
        prefix_cache_reset=True,
        buckets=[_bucket()],
    )


def test_round_medians_ignore_missing_values() -> None:
    rnd = _bucket().rounds[0]
    assert rnd.ttft_median_s == 0.5  # only the streamed sample has a TTFT
    assert rnd.e2e_median_s == 0.8


def test_first_is_round_one_and_steady_the_median_of_the_rest() -> None:
    b = _bucket()
    assert b.first("e2e_median_s") == 0.8
    assert b.steady("e2e_median_s") == (0.25 + 0.1) / 2
    assert b.steady("tpot_median_s") == (0.02 + 0.01) / 2
    single = b.model_copy(update={"rounds": b.rounds[:1]})
    assert single.steady("e2e_median_s") is None


def test_json_round_trip_with_computed_medians(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_json(_report(), path)
    data = json.loads(path.read_text())
    assert data["version"] == 1
    assert data["buckets"][0]["rounds"][0]["ttft_median_s"] == 0.5
    assert Report.model_validate(data).buckets[0].rounds[2].samples[0].tpot_s == 0.01


def test_table_shows_first_and_steady_in_ms() -> None:
    console = Console(width=200, record=True)
    console.print(table(_report()))
    text = console.export_text()
    assert "p4-c1-o8" in text
    assert "800.0" in text and "175.0" in text  # e2e first / steady
    assert "4.57x" in text


def test_summary_is_short() -> None:
    assert _report().summary() == {
        "model": "tiny",
        "engine_start_s": 30.0,
        "warmup_s": 2.5,
        "requests": 6,
        "buckets": 1,
    }
