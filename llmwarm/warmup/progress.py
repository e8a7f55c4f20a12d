"""Where a warm-up is: `WarmupProgress`, what the server reads while it runs (`/ready`, the 503
bodies, `/metrics`), and what the operator watches (a progress bar on a TTY, log lines otherwise).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

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
    from llmwarm.model.report import BucketResult

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


@dataclass
class WarmupProgress:
    """The warm-up under way (or the last one): reset when a warm-up begins."""

    window: int
    started: float | None = None  # time.perf_counter()
    seconds: float | None = None  # set when it ends
    requests: int = 0
    buckets: dict[str, BucketResult] = field(default_factory=dict)
    where: dict[str, Any] = field(default_factory=dict)  # for the 503 body
    done: int = 0  # buckets done (converged, or at their last round)
    planned: int = 0  # buckets the warm-up will run (an optional one that runs adds one)

    def elapsed(self) -> float | None:
        if self.seconds is not None or self.started is None:
            return self.seconds
        return time.perf_counter() - self.started

    def fraction(self) -> float:
        """The share of its buckets done (0 during the KV-cache fill and the prefill sweep)."""
        return min(1.0, self.done / self.planned) if self.planned else 0.0
