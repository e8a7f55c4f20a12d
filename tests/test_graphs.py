"""CUDA-graph capture sizes from a profile: bounded, covering, and cheap in padding (pure; the
config-level tests in test_cli.py hold them to what vLLM keeps and dispatches)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmwarm.backend import capture
from llmwarm.model.fit import EngineShape, auto_buckets
from llmwarm.model.profile import Bucket, load_profile, shipped


@pytest.mark.parametrize("budget", [8192, 16384])
def test_the_default_profile_needs_no_more_graphs_than_vllms_default(budget: int) -> None:
    # The defect: with the default profile, 275 sizes at max_num_batched_tokens 8192 and 1043
    # at 16384, against vLLM's default of 51: minutes of capture and GiBs of graph memory.
    profile = load_profile(shipped("default"))
    assert profile.auto is not None
    shape = EngineShape(max_model_len=32768, max_num_seqs=256, max_num_batched_tokens=budget)
    buckets = [*profile.buckets, *auto_buckets(profile.auto, shape, chat=True)]
    steps = capture.steps(buckets, budget)
    default = capture.vllm_default(256, budget)
    plan = capture.plan(steps, len(default))
    assert len(plan.sizes) <= capture.MAX_SIZES == len(default) == 51
    assert plan.sizes == sorted(set(plan.sizes)) and max(plan.sizes) == max(steps) <= budget
    assert plan.padding == 0  # each warmed step has a graph of its own size
    assert max(default) == 512 < max(steps)  # where vLLM's default would run them eager


def test_with_more_steps_than_room_the_frequent_ones_keep_their_own_graph() -> None:
    often = {16: 100.0, 96: 100.0, 4000: 100.0}
    rare = {n: 0.01 for n in range(100, 3000, 29)}  # 101 steps seen once in a while
    plan = capture.plan({**often, **rare}, default_count=51, most=20)
    assert len(plan.sizes) == 20 and plan.sizes[-1] == 4000  # none runs without a graph
    assert set(often) <= set(plan.sizes)
    assert plan.padding < 0.01  # the frequent steps pay none; the rare ones a little


def test_with_speculative_decoding_every_size_is_a_multiple_of_the_query_length() -> None:
    buckets = [Bucket(prompt_tokens=300, concurrency=c, max_tokens=8) for c in (1, 7, 96)]
    steps = capture.steps(buckets, 2048, spec_tokens=3)
    plan = capture.plan(steps, default_count=19, spec_tokens=3)
    assert all(size % 4 == 0 for size in plan.sizes)
    assert {4, 28, 384, 2048} <= set(plan.sizes)  # decode steps 1, 7 and 96 requests x 4


def test_the_learn_file_adds_the_steps_live_traffic_ran() -> None:
    buckets = [Bucket(prompt_tokens=16, concurrency=1, max_tokens=8)]
    steps = capture.steps(buckets, 8192, learned={(1024, 4): 900, (64, 2): 100})
    assert {1024, 4096, 4, 64, 128} <= set(steps)
    assert steps[4096] > steps[128]  # by their share of the requests


@settings(max_examples=200, deadline=None)
@given(
    steps=st.dictionaries(st.integers(1, 16384), st.floats(0.01, 100), min_size=1, max_size=120),
    most=st.integers(1, 80),
)
def test_a_plan_is_bounded_sorted_and_covers_the_largest_step(
    steps: dict[int, float], most: int
) -> None:
    plan = capture.plan(steps, default_count=51, most=most)
    assert 1 <= len(plan.sizes) <= max(most, 1)
    assert plan.sizes == sorted(set(plan.sizes)) and plan.sizes[-1] == max(steps)
    assert plan.padding >= 0
