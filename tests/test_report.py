from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from llmwarm.model.report import KvFillResult, Report, RoundResult, write_json
from llmwarm.serve.display import plot, summary
from tests.fakes import bucket, sample
from tests.fakes import report as make_report


def test_round_medians_ignore_missing_values() -> None:
    rnd = bucket().rounds[0]
    assert rnd.ttft_median_s == 0.5  # only the streamed sample has a TTFT
    assert rnd.e2e_median_s == 0.8


def test_cold_is_round_one_and_warm_the_median_of_the_last_window() -> None:
    b = bucket()
    assert b.first("e2e") == 0.8
    assert b.warm("e2e", window=2) == (0.25 + 0.1) / 2
    assert b.warm("e2e", window=1) == 0.1
    assert b.warm("tpot", window=5) == (0.02 + 0.01) / 2  # round 1 never counts as warm
    assert b.series("tpot") == [0.05, 0.02, 0.01]
    single = b.model_copy(update={"rounds": b.rounds[:1]})
    assert single.warm("e2e", window=2) is None


def test_a_round_that_sent_earlier_prompts_again_counts_for_decode_only(tmp_path: Path) -> None:
    # round 3 sent round 2's prompts again: a prefix-cache hit's TTFT (2 ms) and e2e are not
    # the bucket's; its time per token is
    b = bucket()
    b.rounds[2] = RoundResult(
        round=3, samples=[sample("completions-stream", 0.05, 0.002, 0.01)], repeats=2
    )
    assert b.warm("ttft", window=3) == 0.1 and b.warm("e2e", window=3) == 0.25
    assert b.series("ttft") == [0.5, 0.1] and b.series("e2e") == [0.8, 0.25]
    assert b.warm("tpot", window=3) == (0.02 + 0.01) / 2
    assert b.measured("tpot") == [(1, 0.05), (2, 0.02), (3, 0.01)]
    assert b.measured("ttft") == [(1, 0.5), (2, 0.1)]
    loaded = Report.model_validate_json(make_report(b).model_dump_json())
    assert [r.repeats for r in loaded.buckets[0].rounds] == [None, None, 2]
    plot(loaded, tmp_path / "r.png")  # the TTFT panel plots rounds 1 and 2 only
    assert (tmp_path / "r.png").stat().st_size > 0


def test_requests_sent_together_are_one_sample_of_the_rule() -> None:
    # a round of three batches: two requests at once in a neighbour's burst, then two in a
    # quiet moment, then one; the rule gets one value a batch (its median), not five
    at_once = [
        sample("completions-stream", 0.4, 0.1, 0.035).model_copy(update={"batch": 0}),
        sample("completions-stream", 0.4, 0.1, 0.033).model_copy(update={"batch": 0}),
        sample("completions", 0.2).model_copy(update={"batch": 1}),  # no TPOT: no value of it
        sample("completions-stream", 0.2, 0.1, 0.017).model_copy(update={"batch": 2}),
        sample("completions-stream", 0.2, 0.1, 0.019).model_copy(update={"batch": 2}),
        sample("completions-stream", 0.2, 0.1, 0.018).model_copy(update={"batch": 3}),
    ]
    b = bucket().model_copy(update={"rounds": [RoundResult(round=1, samples=at_once)]})
    assert b.values("tpot") == [[pytest.approx(0.034), pytest.approx(0.018), 0.018]]
    assert b.values("e2e") == [[0.4, 0.2, 0.2, 0.2]]
    # the report's round median stays the requests' own
    assert b.rounds[0].tpot_median_s == 0.019


def test_json_round_trip_with_computed_medians(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_json(make_report(), path)
    data = json.loads(path.read_text())
    assert data["version"] == 2 and data["converged"] is True
    assert data["convergence"]["window"] == 2 and data["on_unconverged"] == "serve"
    assert data["buckets"][0]["converged_at"] == 3
    assert data["buckets"][0]["rounds"][0]["ttft_median_s"] == 0.5
    assert Report.model_validate(data).buckets[0].rounds[2].samples[0].tpot_s == 0.01


def _shown(report: Report, width: int = 80) -> str:
    console = Console(width=width, record=True)
    console.print(summary(report, Path("/var/lib/llmwarm/report.json")))
    return console.export_text()


def test_the_summary_shows_first_and_warm_in_ms() -> None:
    text = _shown(make_report())
    assert "p4-c1-o8" in text and "3 ✓" in text and "· converged" in text
    assert "800.0→175.0" in text  # e2e: round 1 -> warm
    assert "4.57x" in text
    assert "report: /var/lib/llmwarm/report.json" in text


def test_the_summary_names_unconverged_buckets() -> None:
    late = bucket(converged_at=None).model_copy(update={"name": "late"})
    report = make_report(bucket(), late)
    assert not report.converged and report.unconverged == ["late"]
    text = _shown(report)
    assert "NOT converged (1 ✗)" in text
    row = next(line for line in text.splitlines() if line.lstrip().startswith("late"))
    assert row.split()[1:3] == ["3", "✗"]
    assert report.summary()["unconverged"] == ["late"]


def test_the_summary_fits_80_columns_and_shows_only_what_ran() -> None:
    # The defect: 18 bucket rows, 14 of them `auto-... | 0 | no (skipped) | - | - ...`, and 50
    # kind rows of "-" a user could not act on, in a table 180 columns wide.
    ran = [bucket().model_copy(update={"name": f"p{16 * 2**i}-c{2**i}-o8"}) for i in range(4)]
    skipped = [
        bucket().model_copy(update={
            "name": f"auto-p{8192 // 2**i}-c{2**(i % 7)}-o32", "rounds": [], "optional": True,
            "converged_at": None, "stop_reason": "skipped",
        })
        for i in range(14)
    ]  # fmt: skip
    report = make_report(*ran, *skipped).model_copy(update={
        "endpoints": ["chat", "completions", "messages", "responses"],
        "features": ["greedy", "logprobs", "json_schema", "token_ids"],
        "optional_share": 0.1,
    })  # fmt: skip
    text = _shown(report)
    assert max(map(len, text.splitlines())) <= 80, text
    assert "auto-p" not in text and "skipped" not in text  # no row for what did not run
    assert "+14 optional buckets not run" in text and "budget.optional_share" in text
    # every endpoint the model serves, streamed and not: 8 columns; token IDs only on
    # completions (– elsewhere); what was not sent: ✗
    header = next(line for line in text.splitlines() if "cmpl" in line)
    assert header.split() == ["cmpl", "cmpl", "chat", "chat", "resp", "resp", "msgs", "msgs"]
    token_ids = next(line for line in text.splitlines() if line.lstrip().startswith("token_ids"))
    assert token_ids.split()[1:] == ["✗", "✗", "–", "–", "–", "–", "–", "–"]


def test_plot_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "r.png"
    late = bucket(converged_at=None).model_copy(update={"name": "late"})
    plot(make_report(bucket(), late), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_is_short() -> None:
    assert make_report().summary() == {
        "model": "tiny",
        "engine_start_s": 30.0,
        "warmup_s": 2.5,
        "requests": 6,
        "buckets": 1,
        "converged": True,
        "unconverged": [],
    }


def test_a_features_cold_is_its_sweep_and_its_warm_its_check() -> None:
    b = bucket()
    logprobs = "completions+logprobs"
    b.sweep = RoundResult(round=1, samples=[sample(logprobs, 0.8), sample(logprobs, 0.6)])
    b.check = RoundResult(round=3, samples=[sample(logprobs, 0.2)])
    kinds = {str(k.kind): k for k in make_report(b).kinds}
    assert kinds[logprobs].cold_e2e_s == 0.7 and kinds[logprobs].warm_e2e_s == 0.2
    # the plain kinds keep round 1 against the last window (window 2: rounds 2 and 3)
    assert kinds["completions"].cold_e2e_s == 0.7 and kinds["completions"].warm_e2e_s == 0.2


def test_the_kv_fills_of_two_ranks_add_up() -> None:
    one = KvFillResult(
        blocks=100, block_size=16, target_blocks=50, blocks_reached=50,
        tokens_prefilled=800, requests=4, seconds=1.5,
    )  # fmt: skip
    both = KvFillResult.add(one, one)
    assert both is not None
    assert (both.blocks, both.block_size, both.target_blocks, both.requests) == (200, 16, 100, 8)
    assert both.seconds == 3.0
    assert KvFillResult.add(None, one) is one and KvFillResult.add(None, None) is None
