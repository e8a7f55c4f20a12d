"""What the operator watches during the warm-up: a progress bar on a TTY, log lines otherwise."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as Bar

if TYPE_CHECKING:
    from llmwarm.report import BucketResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """Where the warm-up is, after each round."""

    bucket_index: int  # 1-based
    buckets: int
    bucket: BucketResult  # live: it grows as later rounds run
    round: int  # the round just done
    requests: int  # sent so far
    bucket_done: bool  # converged, or its last allowed round


class ProgressView:
    """Call `update` after every round; a context manager around the whole warm-up."""

    def __init__(
        self, buckets: int, metric: str, console: Console | None = None, optional: int = 0
    ) -> None:
        """`buckets`: those the warm-up will run; `optional`: those it may add if time allows
        (counted in the total once they run, so it never ends below its total)."""
        self.console = console or Console(stderr=True)
        self.buckets = buckets
        self.optional = optional
        self.metric = metric
        self.bar: Bar | None = None
        self.task: TaskID | None = None

    def __enter__(self) -> ProgressView:
        if self.console.is_terminal:
            self.bar = Bar(
                TextColumn("[bold]warming[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("", total=self.buckets)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, p: Progress) -> None:
        b = p.bucket
        series = b.series(self.metric)
        latest = f"{series[-1] * 1000:.2f} ms" if series else "-"
        state = f"converged at round {b.converged_at}" if b.converged else ""
        total = max(self.buckets, p.bucket_index)  # an optional bucket that runs counts
        more = self.buckets + self.optional - total
        where = f"bucket {p.bucket_index}/{total}" + (f" (+{more} optional)" if more else "")
        if self.bar is not None and self.task is not None:
            self.bar.update(
                self.task,
                total=total,
                completed=p.bucket_index - (0 if p.bucket_done else 1),
                description=f"{where} {b.key} round {p.round} ({self.metric} {latest}) {state}",
            )
        else:
            logger.info(
                "warm-up %s %s round %d: %s median %s %s",
                where, b.key, p.round, self.metric, latest, state,
            )  # fmt: skip
