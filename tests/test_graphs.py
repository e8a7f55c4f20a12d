"""CUDA-graph capture sizes from a profile: bounded by what they cost (count, graph pool,
padding), covering, and honest about the trade (pure; the config-level tests in test_cli.py hold
them to what vLLM keeps and dispatches)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmwarm.backend import capture
from llmwarm.model.fit import EngineShape, auto_buckets
from llmwarm.model.profile import Bucket, load_profile, shipped
from llmwarm.model.report import CaptureSizes


def _default_profile_plan(
    seqs: int, budget: int, spec: int = 0, decode_only: bool = False
) -> tuple[capture.Steps, list[int], CaptureSizes]:
    profile = load_profile(shipped("default"))
    assert profile.auto is not None
    shape = EngineShape(max_model_len=32768, max_num_seqs=seqs, max_num_batched_tokens=budget)
    buckets = [*profile.buckets, *auto_buckets(profile.auto, shape, chat=True)]
    found = capture.steps(buckets, budget, spec, max_num_seqs=seqs, decode_only=decode_only)
    default = capture.vllm_default(seqs, budget, spec)
    return found, default, capture.plan(found, default, spec_tokens=spec, decode_only=decode_only)


@pytest.mark.parametrize("budget", [8192, 16384])
def test_the_default_profile_needs_no_more_graphs_than_vllms_default(budget: int) -> None:
    # An earlier defect: with the default profile, 275 sizes at max_num_batched_tokens 8192 and
    # 1043 at 16384, against vLLM's default of 51: minutes of capture and GiBs of graph memory.
    found, default, plan = _default_profile_plan(256, budget)
    assert len(plan.sizes) <= capture.MAX_SIZES == len(default) == 51
    assert plan.sizes == sorted(set(plan.sizes)) and plan.sizes[-1] == plan.ceiling == 512
    assert plan.warmed_padding == 0  # each warmed step under the ceiling has its own graph
    assert plan.uncaptured == sorted(s for s in found.weights if s > 512)


def test_at_h100_defaults_the_plan_is_bounded_by_the_graph_pool_and_the_padding() -> None:
    # The defect: at vLLM's H100 defaults (max_num_seqs 1024, 8192 batched tokens) the plan ran
    # to 8192 tokens: a graph pool 16x vLLM's default's, taken from the KV cache, and the mixed
    # steps above 512 tokens padded up to ~11 % where vLLM's default runs them unpadded.
    found, default, plan = _default_profile_plan(1024, 8192)
    assert max(found.weights) == 8192 and default[-1] == plan.default_largest == 512
    # a decode step of up to 1024 requests keeps a graph (the launches weigh there); the
    # prefills above that run without one, unpadded, as vLLM's default runs them
    assert plan.sizes[-1] == plan.ceiling == 1024 == found.widest_decode
    assert plan.uncaptured == [2048, 4096, 8192]
    assert plan.sizes[-1] <= 2 * plan.default_largest  # the pool grows at most 2x
    # with speculative decoding the widest decode step (1024 x 4 tokens) is compute-bound: no
    # graph past vLLM's largest ceiling anywhere (1024 tokens)
    found, _, plan = _default_profile_plan(1024, 8192, spec=3)
    assert found.widest_decode == 4096 and plan.sizes[-1] == plan.ceiling == capture.DECODE_REACH


def test_the_padding_reported_is_a_step_of_any_size_not_only_the_warmed_ones() -> None:
    # The defect: `padding` weighed only the warmed steps, which each have a graph of their own
    # size: it read 0 for every plan, whatever the steps between them paid.
    found = capture.Steps(weights={1: 1.0, 2: 1.0, 4: 1.0}, widest_decode=4)
    plan = capture.plan(found, default=[1, 2, 4], most=3)
    assert plan.sizes == [1, 2, 4] and plan.warmed_padding == 0
    assert plan.padding == round((4 - 3) / 3 / 4, 4)  # a 3-token step pads to 4; 1, 2, 4 none
    one_graph = sum((8 - n) / n for n in range(1, 9)) / 8  # every step of 1..8 on one of 8
    assert capture.any_step_padding([8], top=8) == pytest.approx(one_graph)
    _, _, h100 = _default_profile_plan(1024, 8192)
    assert h100.padding > 0 and h100.default_padding is not None and h100.default_padding > 0


def test_with_decode_only_graphs_no_size_is_wasted_above_the_widest_decode_step() -> None:
    # The defect: under FULL_DECODE_ONLY a mixed step never runs on a graph, and a decode step
    # holds at most max_num_seqs requests: every size above that was captured for nothing.
    found, _, plan = _default_profile_plan(256, 8192, decode_only=True)
    assert found.widest_decode == 256 and max(found.weights) == 256  # decode steps only
    assert plan.sizes[-1] == plan.ceiling == 256 and plan.uncaptured == []
    _, _, mixed = _default_profile_plan(256, 8192)
    assert mixed.sizes[-1] == 512  # with graphs for mixed steps, vLLM's default's reach


def test_with_more_steps_than_room_the_frequent_ones_keep_their_own_graph() -> None:
    often = {16: 100.0, 96: 100.0, 1000: 100.0}
    rare = {n: 0.01 for n in range(100, 1000, 9)}  # 100 steps seen once in a while
    found = capture.Steps(weights={**often, **rare}, widest_decode=1000)
    plan = capture.plan(found, capture.vllm_default(1024, 8192), most=20)
    assert len(plan.sizes) == 20 and plan.sizes[-1] == 1000  # none runs without a graph
    assert set(often) <= set(plan.sizes)
    assert plan.warmed_padding is not None and plan.warmed_padding < 0.01


def test_with_speculative_decoding_every_size_is_a_multiple_of_the_query_length() -> None:
    buckets = [Bucket(prompt_tokens=300, concurrency=c, max_tokens=8) for c in (1, 7, 96)]
    found = capture.steps(buckets, 2048, spec_tokens=3, max_num_seqs=128)
    plan = capture.plan(found, capture.vllm_default(128, 2048, 3), spec_tokens=3)
    assert all(size % 4 == 0 for size in plan.sizes)
    assert {4, 28, 384} <= set(plan.sizes)  # decode steps 1, 7 and 96 requests x 4
    assert plan.uncaptured == [2048]  # 7 or 96 prompts of 300 at once: the budget


def test_the_learn_file_adds_the_steps_live_traffic_ran() -> None:
    buckets = [Bucket(prompt_tokens=16, concurrency=1, max_tokens=8)]
    found = capture.steps(buckets, 8192, learned={(1024, 4): 900, (64, 2): 100})
    assert {1024, 4096, 4, 64, 128} <= set(found.weights)
    assert found.weights[4096] > found.weights[128]  # by their share of the requests


@settings(max_examples=200, deadline=None)
@given(
    weights=st.dictionaries(st.integers(1, 16384), st.floats(0.01, 100), min_size=1, max_size=120),
    widest=st.integers(1, 4096),
    most=st.integers(1, 80),
    decode_only=st.booleans(),
)
def test_a_plan_is_bounded_sorted_and_covers_the_largest_step_under_its_ceiling(
    weights: dict[int, float], widest: int, most: int, decode_only: bool
) -> None:
    found = capture.Steps(weights={**weights, 1: 1.0}, widest_decode=widest)
    default = capture.vllm_default(256, 8192)
    plan = capture.plan(found, default, most=most, decode_only=decode_only)
    assert plan.ceiling == capture.ceiling(found, default, decode_only)
    assert 1 <= len(plan.sizes) <= max(most, 1)
    assert plan.sizes == sorted(set(plan.sizes)) and plan.sizes[-1] <= plan.ceiling
    assert plan.sizes[-1] == plan.ceiling  # no step under it runs without a graph
    assert plan.uncaptured == sorted(s for s in found.weights if s > plan.ceiling)
    assert plan.padding >= 0 and (plan.warmed_padding or 0) >= 0
