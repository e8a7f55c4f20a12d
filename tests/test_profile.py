from __future__ import annotations

from pathlib import Path

import pytest

from llmwarm.errors import Problem, ProfileError
from llmwarm.profile import (
    EngineShape,
    concurrency_classes,
    for_engine,
    load_profile,
    parse_profile,
    shipped,
    with_adapters,
)

CONFIGS = Path(__file__).parent.parent / "llmwarm" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_profiles_are_valid(path: Path) -> None:
    profile = load_profile(path)
    assert profile.buckets
    assert len({b.name for b in profile.buckets}) == len(profile.buckets)


def test_defaults_and_derived_names() -> None:
    profile = parse_profile({"buckets": [{"prompt_tokens": 8, "concurrency": 2, "max_tokens": 4}]})
    assert profile.convergence.metric == "tpot" and profile.convergence.max_rounds == 12
    assert profile.budget.max_seconds is None
    assert profile.endpoints is None  # what the engine serves; before one is known:
    assert profile.endpoint_names() == ["completions", "chat", "responses", "messages"]
    assert profile.stream == [True, False]
    assert profile.buckets[0].name == "p8-c2-o4"


def _problems(data: object) -> list[Problem]:
    with pytest.raises(ProfileError) as info:
        parse_profile(data)
    assert info.value.problems
    return info.value.problems


BUCKET = {"prompt_tokens": 8, "concurrency": 1, "max_tokens": 4}


@pytest.mark.parametrize(
    ("data", "where", "says"),
    [
        ([1, 2], "profile", "expected a mapping"),
        ({}, "profile", "no buckets: give `buckets`, a `grid`, or `auto`"),
        ({"buckets": []}, "profile", "no buckets"),
        (
            {"buckets": [{**BUCKET, "prompt_tokens": 0}]},
            "buckets.0.prompt_tokens",
            "greater than 0",
        ),
        ({"buckets": [{**BUCKET, "concurrency": -3}]}, "buckets.0.concurrency", "-3"),
        ({"buckets": [{**BUCKET, "max_tokens": "many"}]}, "buckets.0.max_tokens", "'many'"),
        ({"buckets": [{**BUCKET, "colour": "red"}]}, "buckets.0.colour", "Extra inputs"),
        ({"buckets": [BUCKET], "rounds": 3}, "rounds", "Extra inputs"),
        (
            {"buckets": [BUCKET], "convergence": {"min_rounds": 0}},
            "convergence.min_rounds",
            "greater than or equal to 1",
        ),
        (
            {"buckets": [BUCKET], "convergence": {"max_rounds": 2, "min_rounds": 4}},
            "convergence",
            "max_rounds (2) is less than min_rounds (4)",
        ),
        ({"buckets": [BUCKET], "convergence": {"metric": "p99"}}, "convergence.metric", "'p99'"),
        ({"buckets": [BUCKET], "convergence": {"spread": -1}}, "convergence.spread", "(got -1)"),
        ({"buckets": [BUCKET], "budget": {"max_seconds": 0}}, "budget.max_seconds", "than 0"),
        ({"buckets": [BUCKET], "budget": {"seconds": 5}}, "budget.seconds", "Extra inputs"),
        (
            {"buckets": [BUCKET], "stream": [False]},
            "convergence",
            "metric 'tpot' is measured on streamed requests",
        ),
        (
            {"buckets": [BUCKET], "endpoints": ["telepathy"]},
            "endpoints.0",
            "unknown endpoint 'telepathy'",
        ),
        ({"buckets": [BUCKET], "stream": []}, "stream", "at least 1"),
        ({"buckets": [BUCKET], "roundz": 3}, "roundz", "Extra inputs"),
        ({"buckets": [BUCKET, BUCKET]}, "buckets", "repeated: p8-c1-o4"),
        ({"buckets": [BUCKET], "endpoints": ["chat", "chat"]}, "endpoints", "twice"),
    ],
)
def test_bad_profiles_name_the_field(data: object, where: str, says: str) -> None:
    problems = _problems(data)
    assert any(w == where and says in m for w, m in problems), problems


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError) as info:
        load_profile(tmp_path / "missing.yaml")
    assert "cannot read profile" in info.value.message
    assert info.value.problems[0][0].endswith("missing.yaml")


def test_malformed_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("buckets: [\n  - {prompt_tokens: 1\n")
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert "not valid YAML" in info.value.message
    assert "line" in info.value.problems[0][1]


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert "expected a mapping, got NoneType" in info.value.problems[0][1]


# --- grid, priority, extends, prompts -------------------------------------------------------


def test_grid_is_cartesian_and_comes_before_rows_then_priority_orders() -> None:
    profile = parse_profile(
        {
            "grid": {"prompt_tokens": [8, 16], "concurrency": [1, 2], "max_tokens": [4]},
            "buckets": [{**BUCKET, "name": "vip", "priority": 5}],
        }
    )
    assert [b.name for b in profile.buckets] == [
        "vip", "p8-c1-o4", "p8-c2-o4", "p16-c1-o4", "p16-c2-o4",
    ]  # fmt: skip
    assert profile.feature_buckets() == {"vip"}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_extends_merges_mappings_and_replaces_the_rest(tmp_path: Path) -> None:
    _write(
        tmp_path / "base.yaml",
        "buckets: [{prompt_tokens: 8, concurrency: 1, max_tokens: 4}]\n"
        "convergence: {window: 4, max_rounds: 20}\nendpoints: [completions, chat]\n",
    )
    (tmp_path / "sub").mkdir()
    child = _write(
        tmp_path / "sub" / "child.yaml",
        "extends: ../base.yaml\nconvergence: {window: 2}\nendpoints: [chat]\n",
    )
    profile = load_profile(child)
    assert profile.convergence.window == 2 and profile.convergence.max_rounds == 20
    assert profile.endpoints == ["chat"]
    assert profile.buckets[0].name == "p8-c1-o4"


def test_extends_a_shipped_profile_by_name(tmp_path: Path) -> None:
    # e.g. a profile in a Kubernetes ConfigMap, far from llmwarm's configs/
    child = _write(tmp_path / "p.yaml", "extends: chat\nbudget: {max_seconds: 300}\n")
    profile = load_profile(child)
    assert profile.budget.max_seconds == 300
    assert profile.buckets == load_profile(shipped("chat")).buckets


def test_cyclic_extends(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "extends: b.yaml\n")
    _write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ProfileError) as info:
        load_profile(tmp_path / "a.yaml")
    assert info.value.message == "cyclic extends"
    assert "a.yaml -> " in info.value.problems[0][1]


def test_missing_parent(tmp_path: Path) -> None:
    child = _write(tmp_path / "c.yaml", "extends: nowhere.yaml\n")
    with pytest.raises(ProfileError) as info:
        load_profile(child)
    assert info.value.problems[0][0].endswith("c.yaml: extends")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("p.txt", "the first prompt\n\nthe second one\n"),
        ("p.jsonl", '{"prompt": "the first prompt"}\n{"messages": [{"role": "user", '
                    '"content": "the second one"}]}\n'),
    ],
)  # fmt: skip
def test_prompts_file(tmp_path: Path, name: str, text: str) -> None:
    _write(tmp_path / name, text)
    profile = _write(
        tmp_path / "p.yaml",
        "buckets: [{prompt_tokens: 8, concurrency: 1, max_tokens: 4}]\n"
        f"prompts: {{file: {name}}}\n",
    )
    assert load_profile(profile).prompts.texts == ["the first prompt", "the second one"]


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
    assert for_engine(profile, shape).features.kinds() == ["lora:sql", "lora:chat"]


def test_with_adapters_warms_every_listed_adapter_once() -> None:
    plain = parse_profile({"buckets": [BUCKET], "features": {"use": ["greedy"]}})
    assert with_adapters(plain, []) is plain
    both = with_adapters(plain, ["sql", "chat"])
    assert both.features.use == ["greedy", "lora"]
    assert both.features.kinds() == ["greedy", "lora:sql", "lora:chat"]
    named = parse_profile({"buckets": [BUCKET], "features": {"use": ["lora"], "lora": ["sql"]}})
    assert with_adapters(named, ["chat", "sql"]).features.lora == ["sql", "chat"]


def test_auto_buckets_without_cuda_graphs() -> None:
    profile = parse_profile({"auto": {"max_tokens": 16, "max_prompt_tokens": 4096}})
    resolved = for_engine(profile, SHAPE)
    names = [b.name for b in resolved.buckets]
    # prompts doubling up to max_model_len - output - chat allowance (1024 - 16 - 64 = 944)
    assert names[:6] == [f"auto-p{p}-c1-o16" for p in (16, 32, 64, 128, 256, 512)]
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
