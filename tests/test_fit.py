"""Fitting a profile to an engine: limits, auto buckets, adapters, endpoints, images."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmwarm.errors import ProfileError
from llmwarm.model.fit import (
    EngineShape,
    concurrency_classes,
    for_adapter,
    for_engine,
    with_adapters,
)
from llmwarm.model.profile import parse_profile

BUCKET = {"prompt_tokens": 8, "concurrency": 1, "max_tokens": 4}

# --- against an engine ------------------------------------------------------------------------

SHAPE = EngineShape(max_model_len=1024, max_num_seqs=64, max_num_batched_tokens=512)


def test_for_engine_names_buckets_that_do_not_fit() -> None:
    profile = parse_profile({"buckets": [BUCKET, {**BUCKET, "prompt_tokens": 1000}]})
    with pytest.raises(ProfileError) as info:
        for_engine(profile, SHAPE)
    assert info.value.problems == [
        (
            "buckets.1",
            "p1000-c1-o4: prompt_tokens + max_tokens = 1004 (+64 for the chat template) "
            "exceeds the engine's max_model_len 1024",
        )
    ]


def test_lora_needs_lora_enabled_and_known_adapters() -> None:
    profile = parse_profile(
        {"buckets": [BUCKET], "features": {"use": ["lora"], "lora": ["sql", "chat"]}}
    )
    with pytest.raises(ProfileError) as info:
        for_engine(profile, SHAPE)
    assert info.value.problems == [
        ("features.use", "`lora` needs an engine started with --enable-lora")
    ]
    shape = EngineShape(**{**SHAPE.__dict__, "lora_enabled": True, "lora": ["sql"]})
    with pytest.raises(ProfileError) as info:
        for_engine(profile, shape)
    assert info.value.problems == [("features.lora", "no such adapter (--lora-modules): chat")]
    shape = EngineShape(**{**SHAPE.__dict__, "lora_enabled": True, "lora": ["sql", "chat"]})
    assert list(map(str, for_engine(profile, shape).features.features())) == [
        "lora:sql",
        "lora:chat",
    ]


def test_with_lora_enabled_prompt_logprobs_are_not_warmed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Found by the LoRA benchmark: the default profile's prompt_logprobs killed vLLM 0.32's
    # engine with --enable-lora (vllm-project/vllm#16668): the start-up warm-up failed
    profile = parse_profile(
        {"buckets": [BUCKET], "features": {"use": ["greedy", "prompt_logprobs", "logprobs"]}}
    )
    assert "prompt_logprobs" in for_engine(profile, SHAPE).features.use
    lora = EngineShape(**{**SHAPE.__dict__, "lora_enabled": True})
    assert for_engine(profile, lora).features.use == ["greedy", "logprobs"]
    assert "vllm-project/vllm#16668" in caplog.text


def test_an_adapter_s_warm_up_sends_lora_on_it_at_the_feature_buckets() -> None:
    profile = parse_profile(
        {"buckets": [BUCKET, {**BUCKET, "prompt_tokens": 64}, {**BUCKET, "max_tokens": 16}],
         "features": {"use": ["greedy", "logprobs"], "buckets": ["p64-c1-o4"]},
         "kv_fill": {"share": 0.1}}
    )  # fmt: skip
    only = for_adapter(profile, "sql")
    assert [b.name for b in only.buckets] == ["p64-c1-o4"]
    assert list(map(str, only.features.features())) == ["lora:sql"]
    assert only.kv_fill is None and only.prefill is None
    lora = EngineShape(**{**SHAPE.__dict__, "lora_enabled": True, "lora": ["sql"]})
    assert for_engine(only, lora).feature_buckets() == {"p64-c1-o4"}


def test_with_adapters_warms_every_listed_adapter_once() -> None:
    plain = parse_profile({"buckets": [BUCKET], "features": {"use": ["greedy"]}})
    assert with_adapters(plain, []) is plain
    both = with_adapters(plain, ["sql", "chat"])
    assert both.features.use == ["greedy", "lora"]
    assert list(map(str, both.features.features())) == ["greedy", "lora:sql", "lora:chat"]
    named = parse_profile({"buckets": [BUCKET], "features": {"use": ["lora"], "lora": ["sql"]}})
    assert with_adapters(named, ["chat", "sql"]).features.lora == ["sql", "chat"]


def test_auto_buckets_without_cuda_graphs() -> None:
    profile = parse_profile({"auto": {"max_tokens": 16, "max_prompt_tokens": 4096}})
    resolved = for_engine(profile, SHAPE)
    names = [b.name for b in resolved.buckets]
    # prompts doubling up to max_model_len - output - chat allowance (1024 - 16 - 64 = 944)
    assert [b.prompt_tokens for b in resolved.buckets if b.concurrency == 1][:6] == [
        16, 32, 64, 128, 256, 512,
    ]  # fmt: skip
    # a wider batch and a longer prompt in turn, so a cut sweep covers both ranges that far
    assert names[:5] == ["auto-p16-c1-o16", "auto-p16-c2-o16", "auto-p32-c1-o16",
                         "auto-p16-c4-o16", "auto-p64-c1-o16"]  # fmt: skip
    # optional (extra coverage as budget.optional_share allows), after the profile's own buckets
    assert all(b.optional and b.priority == -1 for b in resolved.buckets)
    # concurrency classes: powers of two up to max_num_seqs
    assert [b.concurrency for b in resolved.buckets if b.prompt_tokens == 16] == [
        1, 2, 4, 8, 16, 32, 64,
    ]  # fmt: skip
    # a prompt past max_num_batched_tokens: chunked prefill
    assert "auto-p528-c1-o16" in names
    assert all(b.prompt_tokens + b.max_tokens + 64 <= 1024 for b in resolved.buckets)


def test_concurrency_classes_follow_cuda_graph_padding() -> None:
    shape = EngineShape(
        max_model_len=4096, max_num_seqs=48, max_num_batched_tokens=2048,
        cudagraph_capture_sizes=[1, 2, 4, 8, 16, 24, 32, 40, 48, 56],
    )  # fmt: skip
    # 1..32 doubling, each mapped to the graph a batch of that size is padded to
    assert concurrency_classes(shape, 48) == [1, 2, 4, 8, 16, 32]
    odd = EngineShape(**{**shape.__dict__, "cudagraph_capture_sizes": [1, 3, 6, 12, 48]})
    assert concurrency_classes(odd, 48) == [1, 3, 6, 12, 48]


def test_tools_need_chat_and_a_template_that_takes_them() -> None:
    profile = parse_profile({"buckets": [BUCKET], "features": {"use": ["tools"]}})
    for_engine(profile, SHAPE)
    no_tools = EngineShape(**{**SHAPE.__dict__, "chat_template_tools": False})
    with pytest.raises(ProfileError) as info:
        for_engine(profile, no_tools)
    assert info.value.problems == [
        ("features.use", "`tools`: this model's chat template does not take tools")
    ]
    completions = profile.model_copy(update={"endpoints": ["completions"]})
    with pytest.raises(ProfileError, match="does not fit"):
        for_engine(completions, SHAPE)


# --- what the engine serves -------------------------------------------------------------------

GENERATE = frozenset({"completions", "chat", "responses", "messages"})
EMBED = frozenset({"embeddings", "pooling", "score", "rerank"})


def _shape(endpoints: frozenset[str], **change: object) -> EngineShape:
    return EngineShape(**{**SHAPE.__dict__, "endpoints": endpoints, **change})


def test_default_endpoints_are_what_the_engine_serves() -> None:
    profile = parse_profile({"buckets": [BUCKET]})
    assert for_engine(profile, _shape(GENERATE)).endpoints == [
        "completions", "chat", "responses", "messages",
    ]  # fmt: skip
    pooled = for_engine(profile, _shape(EMBED))
    assert pooled.endpoints == ["embeddings", "pooling", "score", "rerank"]
    # nothing streams on a pooling model: its buckets converge on end-to-end latency
    assert pooled.convergence.metric == "e2e" and profile.convergence.metric == "tpot"


def test_an_endpoint_the_engine_does_not_serve_names_the_row() -> None:
    profile = parse_profile({"buckets": [BUCKET], "endpoints": ["embeddings", "chat"]})
    with pytest.raises(ProfileError) as info:
        for_engine(profile, _shape(EMBED))
    assert info.value.problems == [
        (
            "endpoints.1",
            "this model does not serve 'chat' (it serves: embeddings, pooling, score, rerank);"
            " leave `endpoints` out to warm what it serves",
        )
    ]


def test_images_need_a_vision_model_and_come_by_default_with_one() -> None:
    listed = parse_profile({"buckets": [BUCKET], "features": {"use": ["greedy", "image"]}})
    with pytest.raises(ProfileError) as info:
        for_engine(listed, _shape(GENERATE))
    assert info.value.problems == [
        ("features.use", "`image`: this model takes no images (it is text-only)")
    ]
    plain = parse_profile({"buckets": [BUCKET]})
    vision = _shape(GENERATE, multimodal=True)
    assert "image" in for_engine(plain, vision).features.use
    assert "image" not in for_engine(plain, _shape(GENERATE)).features.use
    off = parse_profile({"buckets": [BUCKET], "features": {"auto_image": False}})
    assert "image" not in for_engine(off, vision).features.use


def test_score_buckets_hold_a_query_and_a_document() -> None:
    profile = parse_profile({"buckets": [{**BUCKET, "prompt_tokens": 600}], "endpoints": ["score"]})
    with pytest.raises(ProfileError) as info:
        for_engine(profile, _shape(EMBED))
    assert "2 x prompt_tokens (query and document) = 1200" in info.value.problems[0].message


@pytest.mark.parametrize(
    ("flags", "ranks", "pinned"),
    [
        ((), (), False),
        (("--data-parallel-size", "2"), (0, 1), True),  # one server balancing over both
        # ranks 2 and 3 on a --headless node: the head's server fronts them all
        (("--data-parallel-size", "4", "--data-parallel-size-local", "2"), (0, 1, 2, 3), True),
        # one server per rank (llm-d's wide-EP; vLLM takes it for a mixture of experts only):
        # its own rank, nothing to pin
        (("--data-parallel-size", "2", "--data-parallel-rank", "1"), (1,), False),
    ],
)
def test_the_ranks_a_server_warms_come_from_vllms_parallel_config(
    tiny_moe: Path, flags: tuple[str, ...], ranks: tuple[int, ...], pinned: bool
) -> None:
    from llmwarm.backend import engine, vllm_args

    args = vllm_args.parse_args([str(tiny_moe), *flags], "test")
    shape = engine.shape_from_args(args)
    assert (shape.dp_ranks, shape.dp_pinned) == (ranks, pinned)
    assert shape.ranks() == ([*ranks] if ranks else [None])
