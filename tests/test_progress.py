from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from llmwarm.warmup.progress import Progress, ProgressView
from tests.fakes import bucket as _bucket


def _progress(round_: int, done: bool) -> Progress:
    return Progress(
        bucket_index=1, buckets=2, bucket=_bucket(), round=round_, requests=4,
        bucket_done=done,
    )  # fmt: skip


def test_plain_log_lines_when_not_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    console = Console(file=io.StringIO(), force_terminal=False)
    with caplog.at_level(logging.INFO, logger="llmwarm"), ProgressView(2, "tpot", console) as view:
        view.update(_progress(3, done=True))
    assert view.bar is None
    assert "warm-up bucket 1/2 p4-c1-o8 round 3: tpot median 10.00 ms converged at round 3" in (
        caplog.text
    )


def test_progress_bar_on_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=150)
    with ProgressView(2, "tpot", console) as view:
        assert view.bar is not None and view.task is not None
        view.update(_progress(2, done=False))
        task = view.bar.tasks[0]
        assert task.completed == 0 and task.total == 2
        assert "bucket 1/2 p4-c1-o8 round 2" in task.description
        view.update(_progress(3, done=True))
        assert view.bar.tasks[0].completed == 1
