"""Has a bucket's latency settled? Pure statistics over each round's samples; no I/O.

A sample is what was measured at one moment: the warm-up gives one per batch of requests sent
together, its median (`report.BucketResult.values`). Requests of one batch share the engine's
steps and the host's moment, so their spread is not the noise between moments: counted as
several samples, four requests at once under one neighbour's burst would measure no noise at
all, and the next round's different moment would look like a change. Each round's statistic
is the *median* of that round's samples: one slowed by a GC pause, a page fault or the other
core's scheduler moves a mean but not a median. The rule looks at a window of the last
`window` rounds and asks for

  * a small spread: the range (max - min) of the window's round medians at most
    `spread` x their median, *or*, on a noisy host, at most what sampling noise alone explains:
    `RANGE_Q` standard errors of a round median. The noise is measured, not assumed: the
    pooled median absolute deviation of every sample in the window about its own round's
    median (robust sigma = 1.4826 MAD), and a round median's standard error 1.2533 sigma /
    sqrt(n) for its n samples (the warm-up sends `MIN_ROUND_SAMPLES` batches a round where
    it needs the noise: `corpus.sampled_batches`). A window of one sample a round measures no
    noise and is held to the fixed `spread`. The range, not a MAD, across rounds, on
    purpose: with three or so rounds a MAD ignores one bad round, and a late spike must block
    convergence;
  * no improvement still under way: the latest round is not faster than the best earlier
    round of the window by more than `improvement` (or, if more, `GAIN_Z` standard errors
    of the difference of two medians);
  * no steady drift: the last `DRIFT_ROUNDS` round medians (three, while there are only
    three) do not each fall below, or each rise above, the one before (each by more than
    `STEP_MIN`) by more in all than `DRIFT_MIN` and than noise explains (`GAIN_Z` standard
    errors of a difference). A drift slower than the noise allowance passes the first two
    tests, not this one. It takes two steps the same way: one step between two rounds is a
    change, the first two tests' to judge (a window of two rounds is held to its `spread`, not
    to `DRIFT_MIN`); and a step then rounds that agree within `STEP_MIN` are a step, not a
    drift (a round that warmed, then nothing more: 56.74, 56.15, 56.11 ms a token).

Before its window is full, a bucket converges only if its rounds have agreed from round 1 on:
from `min_rounds` (at least two), every round median so far within `SETTLED` (half the drift
test's `DRIFT_MIN`) of their median. Round 1 was then as fast as the rounds after it: nothing
was cold at that shape (earlier buckets and the prefill sweep paid for it), and decode rounds
there would only repeat themselves. That exit keeps the window's guarantees: a cold first round
slower by more than `SETTLED` never takes it, and neither does a drift the drift test would
catch (more than `DRIFT_MIN` over two steps is more than `SETTLED` a step); a slower drift passes
the full window too.

So a stationary series converges as soon as its window is measured, however noisy, as long as
each round has a few samples (a quiet one, from `min_rounds` on); a step down converges
`window - 1` rounds after the step once the step is larger than the noise allowance; a steady
drift never converges once three rounds show it (faster than spread / (window - 1) a round:
the range; slower: the drift test; a window of two may pass its second round, whose one step
is within the spread).
`max_rounds` bounds it all, so the rule terminates on any series.
"""

from __future__ import annotations

import math
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
    allow_noise: bool = Field(
        default=True,
        description="Let the window's round medians lie as far apart as their measured noise "
        "explains, when that is more than `spread` (and the latest gain likewise); false: "
        "`spread` and `improvement` alone.",
    )
    min_rounds: int = Field(
        default=2,
        ge=1,
        le=1000,
        description="Never converged before this many rounds. Below `window`, a bucket whose "
        "rounds have all agreed within 0.5 % (nothing cold at its shape) converges from here.",
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

    @property
    def earliest(self) -> int:
        """The first round at which a bucket can converge: `min_rounds`, at least two, when
        that is before the window is full (rounds settled from the start), else the window."""
        full = max(self.min_rounds, self.window)
        return min(max(self.min_rounds, 2), full)


# The 95 % point of the range of 3 normal means (studentised range, infinite degrees of
# freedom): how far apart a window's round medians may lie from sampling noise alone.
RANGE_Q = 4.5
# Standard errors of the difference of two round medians that count as a real improvement.
GAIN_Z = 2.0
# Samples of the metric a round needs, at least, for its noise to be measured (the warm-up
# repeats a round's batches that carry the metric until this many batches have).
MIN_ROUND_SAMPLES = 3
# Round medians each below (or each above) the one before, by more in all than this share and
# than noise explains: a drift still under way.
DRIFT_ROUNDS = 4
DRIFT_MIN = 0.01
# A step of a drift: a round median past the one before by more than this share of the window's
# median. A drift the test catches moves DRIFT_MIN over two steps, half of it a step on
# average; a step of a quarter of that is within a quiet host's round-to-round noise and says
# nothing of direction. Counted as a step, it made a cold round 1 then two rounds that agree a
# drift one time in two (which of the two is faster is chance).
STEP_MIN = DRIFT_MIN / 4
# Before a full window: the range of every round median so far, over their median, within
# which round 1 was not cold and no drift shows (the drift test's DRIFT_MIN over two steps)
SETTLED = DRIFT_MIN / 2


@dataclass(frozen=True)
class Verdict:
    converged: bool
    reason: str
    # the largest standard error of a window round median / median; None: not measured (no
    # round of the window had two samples)
    noise: float | None = None
    window_full: bool = False  # enough rounds were there to judge (a "no" is then the rule's)
    drifting: int = 0  # the rounds the drift test saw, when it was the one that said no
    # the spread said no, and only for the window's oldest round: the rest agree (a step)
    stepped: bool = False


def _standard_error(window: Sequence[Sequence[float]]) -> float | None:
    """The largest standard error of a round median in the window, from the pooled robust
    sigma of the requests about their own round's median (None when no round has two)."""
    deviations: list[float] = []
    for samples in window:
        if len(samples) > 1:
            mid = statistics.median(samples)
            own = sorted(abs(x - mid) for x in samples)
            # an odd round's median is one of its samples: its own zero deviation says nothing
            deviations += own[len(samples) % 2 :]
    if not deviations:
        return None
    sigma = 1.4826 * statistics.median(deviations)
    return 1.2533 * sigma / math.sqrt(min(len(samples) for samples in window))


def check(rounds: Sequence[Sequence[float]], rule: Rule) -> Verdict:
    """Judge rounds of per-request values (each round's samples), oldest first."""
    rounds = [r for r in rounds if r]
    n = len(rounds)
    full = max(rule.min_rounds, rule.window)
    if n < full:
        if n < rule.earliest:
            return Verdict(False, f"{n} of at least {rule.earliest} rounds")
        return _settled(rounds, full)
    window = rounds[-rule.window :]
    medians = [statistics.median(r) for r in window]
    mid = statistics.median(medians)
    if mid <= 0:
        return Verdict(False, "non-positive latency")
    measured = _standard_error(window)
    noise = None if measured is None else measured / mid
    spread = (max(medians) - min(medians)) / mid
    se = measured if measured is not None and rule.allow_noise else 0.0  # else: fixed thresholds
    allowed = max(rule.spread, RANGE_Q * se / mid)
    if spread > allowed:
        rest = medians[1:]
        stepped = len(rest) > 1 and (max(rest) - min(rest)) / statistics.median(rest) <= allowed
        return Verdict(
            False, f"spread {spread:.1%} > {allowed:.0%}", noise, window_full=True, stepped=stepped
        )
    best_before = min(medians[:-1])
    gain = (best_before - medians[-1]) / best_before
    if gain > max(rule.improvement, GAIN_Z * math.sqrt(2) * se / best_before):
        return Verdict(
            False, f"still improving ({gain:.1%} > {rule.improvement:.0%})", noise, window_full=True
        )
    recent = [statistics.median(r) for r in rounds[-DRIFT_ROUNDS:]]
    steps = list(zip(recent[:-1], recent[1:], strict=True))
    moved = abs(recent[-1] - recent[0])
    # one step is a change, judged above; a drift is two or more the same way, each a step
    least = STEP_MIN * mid
    monotone = len(steps) > 1 and (
        all(a - b > least for a, b in steps) or all(b - a > least for a, b in steps)
    )
    if monotone and moved > max(DRIFT_MIN * mid, GAIN_Z * math.sqrt(2) * se):
        return Verdict(
            False,
            f"drifting, round after round ({len(recent)} rounds)",
            noise,
            window_full=True,
            drifting=len(recent),
        )
    return Verdict(
        True, f"spread {spread:.1%} over the last {rule.window} rounds", noise, window_full=True
    )


def _settled(rounds: Sequence[Sequence[float]], full: int) -> Verdict:
    """Before a full window: converged if every round median so far lies within `SETTLED`."""
    medians = [statistics.median(r) for r in rounds]
    mid = statistics.median(medians)
    if mid <= 0:
        return Verdict(False, "non-positive latency")
    spread = (max(medians) - min(medians)) / mid
    if spread > SETTLED:
        return Verdict(False, f"{len(rounds)} of {full} rounds (spread {spread:.1%})")
    return Verdict(True, f"settled from round 1: spread {spread:.2%} over {len(rounds)} rounds")


def converged_at(rounds: Sequence[Sequence[float]], rule: Rule) -> int | None:
    """The first round (1-based) at which the rule holds, looking at rounds up to max_rounds."""
    for n in range(1, min(len(rounds), rule.max_rounds) + 1):
        if check(rounds[:n], rule).converged:
            return n
    return None
