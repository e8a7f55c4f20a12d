from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from llmwarm.convergence import Rule, check, converged_at

RULE = Rule(window=3, spread=0.10, improvement=0.05, min_rounds=3, max_rounds=30)


def test_flat_series_converges_as_soon_as_allowed() -> None:
    assert converged_at([1.0] * 10, RULE) == 3


@pytest.mark.parametrize("step_at", [2, 4, 7])
def test_step_down_stops_within_two_rounds_of_stabilising(step_at: int) -> None:
    # falling by half a round (a cold engine getting warm), stable from round `step_at`
    series = [2.0 ** (step_at - i) for i in range(1, step_at)] + [1.0] * 20
    at = converged_at(series, RULE)
    assert at is not None and step_at <= at <= step_at + 2


def test_noisy_step_down_still_terminates_close_to_the_step() -> None:
    rng = random.Random(7)
    series = [5.0, 3.0] + [1.0 + rng.uniform(-0.03, 0.03) for _ in range(20)]
    at = converged_at(series, RULE)
    assert at is not None and at <= 3 + 2


@pytest.mark.parametrize("direction", [1, -1])
def test_steady_drift_never_converges(direction: int) -> None:
    # 6 % a round: a window of three spreads 12 % > 10 %
    series = [1.0 * (1 + direction * 0.06) ** i for i in range(30)]
    assert converged_at(series, RULE) is None


def test_late_spike_blocks_until_it_leaves_the_window() -> None:
    series = [1.0] * 5 + [3.0]
    assert not check(series, RULE).converged
    assert not check([*series, 1.0], RULE).converged
    assert not check([*series, 1.0, 1.0], RULE).converged
    assert check([*series, 1.0, 1.0, 1.0], RULE).converged


def test_still_improving_within_the_spread() -> None:
    rule = RULE.model_copy(update={"spread": 0.5})
    verdict = check([1.2, 1.2, 1.0], rule)
    assert not verdict.converged and "still improving" in verdict.reason


def test_min_rounds_and_window() -> None:
    rule = RULE.model_copy(update={"min_rounds": 5})
    assert converged_at([1.0] * 10, rule) == 5
    assert not check([1.0, 1.0], RULE).converged


def test_noise_that_never_settles_ends_at_max_rounds() -> None:
    rng = random.Random(1)
    series = [rng.uniform(0.5, 2.0) for _ in range(100)]
    rule = RULE.model_copy(update={"max_rounds": 12})
    # converged_at looks no further than max_rounds: termination is guaranteed
    at = converged_at(series, rule)
    assert at is None or at <= 12


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"max_rounds": 2, "min_rounds": 3}, "less than min_rounds"),
        ({"max_rounds": 3, "window": 4, "min_rounds": 1}, "less than window"),
        ({"window": 1}, "greater than or equal to 2"),
        ({"spread": 0}, "greater than 0"),
        ({"metric": "speed"}, "'tpot', 'ttft' or 'e2e'"),
    ],
)
def test_bad_rules(fields: dict[str, object], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        Rule.model_validate(fields)


# --- properties -----------------------------------------------------------------------------

rules = st.builds(
    Rule,
    window=st.integers(2, 6),
    spread=st.floats(0.02, 0.5),  # the default is 0.15
    improvement=st.floats(0.0, 0.3),
    min_rounds=st.integers(1, 6),
    max_rounds=st.integers(6, 40),
)
latencies = st.floats(1e-4, 10.0, allow_nan=False)


@given(rules, st.lists(latencies, min_size=0, max_size=60))
def test_converged_at_is_bounded_and_consistent(rule: Rule, series: list[float]) -> None:
    at = converged_at(series, rule)
    if at is not None:
        assert max(rule.min_rounds, rule.window) <= at <= rule.max_rounds
        assert check(series[:at], rule).converged
        assert not any(check(series[:n], rule).converged for n in range(1, at))


@given(rules, latencies, st.integers(0, 30))
def test_flat_series_always_converges(rule: Rule, value: float, extra: int) -> None:
    series = [value] * (rule.max_rounds + extra)
    assert converged_at(series, rule) == max(rule.min_rounds, rule.window)


@given(rules, latencies, st.floats(1.01, 3.0))
def test_drift_faster_than_the_window_allows_never_converges(
    rule: Rule, start: float, factor: float
) -> None:
    # Growth r a round such that even relative to the window's largest value the range
    # exceeds the spread: 1 - r^-(window-1) > spread. Rising and falling alike.
    r = (1 / (1 - rule.spread)) ** (1 / (rule.window - 1)) * factor
    rising = [start * r**i for i in range(rule.max_rounds)]
    assert converged_at(rising, rule) is None
    assert converged_at(rising[::-1], rule) is None


@given(rules, st.lists(latencies, min_size=10, max_size=30), st.floats(2.0, 10.0))
def test_a_spike_in_the_window_blocks_convergence(
    rule: Rule, series: list[float], factor: float
) -> None:
    if rule.spread >= factor - 1:
        return
    spiked = [*series, max(series) * factor]
    assert not check(spiked, rule).converged


@settings(max_examples=50)
@given(rules, st.integers(1, 10), latencies, st.floats(1.5, 20.0))
def test_step_down_converges_within_window_rounds(
    rule: Rule, stable_from: int, low: float, ratio: float
) -> None:
    # each cold round slower than the next by more than the spread can hide
    r = max(ratio, 1.5 / (1 - rule.spread))
    cold = [low * r ** (stable_from - i) for i in range(1, stable_from)]
    series = cold + [low] * (rule.max_rounds + rule.window)
    at = converged_at(series, rule)
    expected = max(stable_from + rule.window - 1, rule.min_rounds)
    if expected <= rule.max_rounds:
        assert at == expected
    else:
        assert at is None
