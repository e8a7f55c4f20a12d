from __future__ import annotations

from pathlib import Path

import pytest

from llmwarm.errors import Problem, ProfileError
from llmwarm.model.profile import load_profile, parse_profile, shipped

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
