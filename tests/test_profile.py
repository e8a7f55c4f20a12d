from __future__ import annotations

from pathlib import Path

import pytest

from llmwarm.errors import ProfileError
from llmwarm.profile import load_profile, parse_profile

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
    assert profile.endpoints == ["completions", "chat"]
    assert profile.stream == [True, False]
    assert profile.buckets[0].name == "p8-c2-o4"


def _problems(data: object) -> list[tuple[str, str]]:
    with pytest.raises(ProfileError) as info:
        parse_profile(data)
    assert info.value.problems
    return info.value.problems


BUCKET = {"prompt_tokens": 8, "concurrency": 1, "max_tokens": 4}


@pytest.mark.parametrize(
    ("data", "where", "says"),
    [
        ([1, 2], "profile", "expected a mapping"),
        ({}, "buckets", "Field required"),
        ({"buckets": []}, "buckets", "at least 1"),
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
        ({"buckets": [BUCKET], "endpoints": ["embeddings"]}, "endpoints.0", "'embeddings'"),
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
