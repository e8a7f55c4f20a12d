"""Has a bucket's latency settled? Pure statistics over per-round medians; no I/O.

Each round's statistic is the *median* over that round's requests: one request slowed by a
GC pause, a page fault or the other core's scheduler moves a mean but not a median. Across
rounds the rule looks at a window of the last `window` round medians and asks for

  * a small spread, (max - min) / median <= `spread`: the *range*, not a MAD, on purpose; with
    three or so rounds a MAD ignores one bad round, and a late spike must block convergence;
  * no improvement still under way: the latest round is not faster than the best earlier
    round in the window by more than `improvement`.

A series that keeps drifting by more than spread / (window - 1) per round can never pass the
spread test; a step down passes `window - 1` rounds after the step. `max_rounds` bounds it all,
so the rule terminates on any series.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Metric = Literal["tpot", "ttft", "e2e"]


class Rule(BaseModel):
    """When a bucket counts as warm."""

    model_config = ConfigDict(extra="forbid")

    metric: Metric = Field(
        default="tpot",
        description="Which per-round median must settle: `tpot` (time per output token, "
        "decode), `ttft` (time to first token) or `e2e` (whole request). `tpot` and `ttft` "
        "need streamed requests (`stream` includes true).",
    )
    window: int = Field(
        default=3, ge=2, le=50, description="How many of the latest rounds must agree."
    )
    spread: float = Field(
        default=0.15,
        gt=0,
        le=10,
        description="Largest (max - min) / median of the window's round medians.",
    )
    improvement: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Largest share by which the latest round may beat the best earlier round "
        "of the window (more means it is still getting faster).",
    )
    min_rounds: int = Field(
        default=3, ge=1, le=1000, description="Never converged before this many rounds."
    )
    max_rounds: int = Field(
        default=12, ge=1, le=1000, description="Stop after this many rounds, converged or not."
    )

    @model_validator(mode="after")
    def _bounds(self) -> Rule:
        if self.max_rounds < self.min_rounds:
            raise ValueError(
                f"max_rounds ({self.max_rounds}) is less than min_rounds ({self.min_rounds})"
            )
        if self.max_rounds < self.window:
            raise ValueError(
                f"max_rounds ({self.max_rounds}) is less than window ({self.window}): "
                "the bucket could never converge"
            )
        return self


@dataclass(frozen=True)
class Verdict:
    converged: bool
    reason: str


def check(series: Sequence[float], rule: Rule) -> Verdict:
    """Judge a series of per-round medians, oldest first."""
    n = len(series)
    if n < max(rule.min_rounds, rule.window):
        return Verdict(False, f"{n} of at least {max(rule.min_rounds, rule.window)} rounds")
    window = list(series[-rule.window :])
    mid = statistics.median(window)
    if mid <= 0:
        return Verdict(False, "non-positive latency")
    spread = (max(window) - min(window)) / mid
    if spread > rule.spread:
        return Verdict(False, f"spread {spread:.1%} > {rule.spread:.0%}")
    best_before = min(window[:-1])
    gain = (best_before - window[-1]) / best_before
    if gain > rule.improvement:
        return Verdict(False, f"still improving ({gain:.1%} > {rule.improvement:.0%})")
    return Verdict(True, f"spread {spread:.1%} over the last {rule.window} rounds")


def converged_at(series: Sequence[float], rule: Rule) -> int | None:
    """The first round (1-based) at which the rule holds, looking at rounds up to max_rounds."""
    for n in range(1, min(len(series), rule.max_rounds) + 1):
        if check(series[:n], rule).converged:
            return n
    return None
