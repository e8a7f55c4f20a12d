from __future__ import annotations

from collections.abc import Sequence

import pytest

from llmwarm import corpus
from llmwarm.errors import ProfileError
from llmwarm.profile import Profile, parse_profile


class WordTokenizer:
    """One token per whitespace-separated word."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        words = {i: w for w, i in self.vocab.items()}
        return " ".join(words[i] for i in ids)


class CharTokenizer:
    """One token per character, so truncation goes through decode."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(map(chr, ids))


PROFILE = parse_profile(
    {
        "buckets": [
            {"prompt_tokens": 12, "concurrency": 3, "max_tokens": 5},
            {"prompt_tokens": 40, "concurrency": 1, "max_tokens": 7},
        ],
    }
)


def plan(profile: Profile, tokenizer: corpus.Tokenizer, model: str, rounds: int = 2) -> list:
    return [
        batch
        for bucket in profile.buckets
        for round_ in range(1, rounds + 1)
        for batch in corpus.round_batches(profile, bucket, round_, tokenizer, model)
    ]


@pytest.mark.parametrize("tokenizer", [WordTokenizer(), CharTokenizer()])
def test_prompts_have_exact_token_counts(tokenizer: corpus.Tokenizer) -> None:
    for batch in plan(PROFILE, tokenizer, "m"):
        for req in batch.requests:
            text = req.body.get("prompt") or req.body["messages"][0]["content"]
            assert len(tokenizer.encode(text)) == batch.bucket.prompt_tokens


def test_plan_order_and_shape() -> None:
    batches = plan(PROFILE, WordTokenizer(), "tiny")
    # bucket-major, then round, then the four request kinds
    assert [(b.bucket.name, b.round, b.kind) for b in batches[:5]] == [
        ("p12-c3-o5", 1, "completions-stream"),
        ("p12-c3-o5", 1, "completions"),
        ("p12-c3-o5", 1, "chat-stream"),
        ("p12-c3-o5", 1, "chat"),
        ("p12-c3-o5", 2, "completions-stream"),
    ]
    assert len(batches) == 2 * 2 * 4
    assert sum(len(b.requests) for b in batches) == (3 + 1) * 2 * 4
    first = batches[0]
    assert len(first.requests) == 3
    body = first.requests[0].body
    assert body["model"] == "tiny" and body["max_tokens"] == 5 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert first.requests[0].path == "/v1/completions"
    chat = batches[3].requests[0]
    assert chat.path == "/v1/chat/completions" and "stream" not in chat.body


def test_plan_is_deterministic_and_prompts_differ() -> None:
    a = [r.body for b in plan(PROFILE, WordTokenizer(), "m") for r in b.requests]
    b = [r.body for b in plan(PROFILE, WordTokenizer(), "m") for r in b.requests]
    assert a == b
    prompts = [body.get("prompt") or body["messages"][0]["content"] for body in a]
    # every request has its own prompt, and no two share their first words (prefix cache)
    assert len(set(prompts)) == len(prompts)
    assert len({p.split()[0] + p.split()[1] for p in prompts}) > len(prompts) * 0.9


def test_seed_changes_prompts() -> None:
    other = PROFILE.model_copy(update={"seed": 1})
    first = plan(PROFILE, WordTokenizer(), "m")[0].requests[0].body["prompt"]
    second = plan(other, WordTokenizer(), "m")[0].requests[0].body["prompt"]
    assert first != second


def test_check_fits_names_the_bucket() -> None:
    corpus.check_fits(PROFILE, 40 + 7 + corpus.CHAT_TEMPLATE_ALLOWANCE)
    with pytest.raises(ProfileError) as info:
        corpus.check_fits(PROFILE, 100)
    assert info.value.problems == [
        (
            "buckets.1",
            "prompt_tokens + max_tokens = 47 (+64 for the chat template) exceeds the "
            "engine's max_model_len 100",
        )
    ]


def test_check_fits_without_chat_needs_no_allowance() -> None:
    completions_only = PROFILE.model_copy(update={"endpoints": ["completions"]})
    corpus.check_fits(completions_only, 47)
    with pytest.raises(ProfileError):
        corpus.check_fits(completions_only, 46)
