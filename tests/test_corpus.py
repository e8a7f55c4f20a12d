from __future__ import annotations

from collections.abc import Sequence

import pytest

from llmwarm.model import corpus, features
from llmwarm.model.convergence import MIN_ROUND_SAMPLES, Rule, check
from llmwarm.model.corpus import WordTokenizer
from llmwarm.model.profile import Profile, parse_profile


class CharTokenizer:
    """One token per character, so truncation goes through decode."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(map(chr, ids))


PROFILE = parse_profile(
    {
        "endpoints": ["completions", "chat"],
        "buckets": [
            {"prompt_tokens": 12, "concurrency": 3, "max_tokens": 5},
            {"prompt_tokens": 40, "concurrency": 1, "max_tokens": 7},
        ],
    }
)


def plan(
    profile: Profile, tokenizer: corpus.Tokenizer, model: str, rounds: int = 2
) -> list[corpus.Batch]:
    """Every kind of every bucket, round after round (rounds repeat only some: this covers
    the bodies of all)."""
    return [
        corpus.Corpus(profile, tokenizer, model).batch(bucket, kind, round_)
        for bucket in profile.buckets
        for round_ in range(1, rounds + 1)
        for kind in corpus.kinds(profile, bucket)
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
    assert [(b.bucket.name, b.round, str(b.kind)) for b in batches[:5]] == [
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


def test_plain_buckets_send_greedy_and_feature_buckets_every_feature() -> None:
    profile = parse_profile(
        {
            "buckets": [
                {"prompt_tokens": 8, "concurrency": 1, "max_tokens": 4},
                {"prompt_tokens": 16, "concurrency": 2, "max_tokens": 4},
            ],
            "endpoints": ["completions", "chat"],
            "features": {"use": ["greedy", "logprobs", "prompt_logprobs", "choice"]},
        }
    )
    first, second = profile.buckets
    assert [str(k) for k in corpus.kinds(profile, second)] == [
        "completions-stream", "completions", "chat-stream", "chat",
    ]  # fmt: skip
    names = [str(k) for k in corpus.kinds(profile, first)]
    assert names[:4] == ["completions-stream", "completions", "chat-stream", "chat"]
    assert "completions+logprobs" in names and "chat-stream+logprobs" in names
    # vLLM refuses prompt_logprobs on a stream
    assert "completions+prompt_logprobs" in names
    assert "completions-stream+prompt_logprobs" not in names
    assert len(names) == 4 + 4 + 2 + 4
    # every round repeats the first endpoint, plain, streamed (the rule's TPOT); every other
    # endpoint, mode and feature goes in a sweep and a check
    assert [str(k) for k in corpus.round_kinds(profile, first)] == names[:1]
    assert [str(k) for k in corpus.sweep_kinds(profile, first)] == names[1:]
    # a round's requests: one batch (a noisy host's rounds repeat it)
    assert corpus.requests_per_round(profile, first) == 1
    assert corpus.requests_per_sweep(profile, first) == 13
    assert corpus.requests_per_round(profile, second) == 2
    requests = corpus.Corpus(profile, WordTokenizer(), "m")
    sweep = requests.sweep_requests(first, 1)
    assert [str(r.kind) for r in sweep] == names[1:]
    assert {r.bucket for r in sweep} == {first.name}
    long = first.model_copy(update={"max_tokens": 64, "prompt_tokens": 200})
    # a sweep touches each cold path at a request's start: 2 output tokens at most (its
    # prefill's and one decode step's), and no cold path depends on the prompt's length: 4
    # prompt tokens at most (one prefill step of the whole sweep, a chat template's own
    # tokens apart)
    long_sweep = requests.sweep_requests(long, 1)
    assert {r.body.get("max_tokens") for r in long_sweep} == {corpus.SWEEP_MAX_TOKENS} == {2}
    assert corpus.SWEEP_PROMPT_TOKENS == 4
    tokenizer = WordTokenizer()
    assert {
        len(tokenizer.encode(r.body.get("prompt") or r.body["messages"][-1]["content"]))
        for r in long_sweep
    } == {4}
    assert {r.bucket for r in long_sweep} == {first.name}  # the bucket's, all the same
    # a kind's own path is paid once whatever the shape: the second bucket sweeps nothing
    # the first one sent, so nothing at all
    assert corpus.sweep_kinds(profile, second) == []
    assert requests.sweep_requests(second, 1) == []
    # ... and what only a later bucket sends, it sweeps there
    later = profile.model_copy(update={"features": profile.features.model_copy(
        update={"buckets": [second.name]})})  # fmt: skip
    assert [str(k) for k in corpus.sweep_kinds(later, first)] == names[1:4]
    assert corpus.sweep_kinds(later, second) == corpus.sweep_kinds(profile, first)[3:]


def test_feature_bodies_reach_the_requests() -> None:
    profile = parse_profile(
        {
            "buckets": [{"prompt_tokens": 8, "concurrency": 1, "max_tokens": 4}],
            "features": {"use": ["logprobs", "choice"]},
        }
    )
    bucket = profile.buckets[0]
    batches = corpus.Corpus(profile, WordTokenizer(), "m").round_batches(bucket, 1)
    # without greedy, the first feature is what rounds repeat, streamed (TPOT); the rest go in
    # the sweep
    assert [str(b.kind) for b in batches] == ["completions-stream+logprobs"]
    sweep = corpus.Corpus(profile, WordTokenizer(), "m").sweep_requests(bucket, 1)
    bodies = {str(r.kind): r.body for r in [*(b.requests[0] for b in batches), *sweep]}
    assert bodies["completions+logprobs"]["logprobs"] == 5
    assert bodies["chat+logprobs"]["top_logprobs"] == 5
    assert bodies["chat+logprobs"]["ignore_eos"] is True
    choice = bodies["chat-stream+choice"]
    assert choice["structured_outputs"] == {"choice": ["yes", "no", "maybe"]}
    # a constrained output ends when the constraint is met: EOS must not be ignored
    assert "ignore_eos" not in choice


def test_prompts_from_a_pool_have_exact_token_counts() -> None:
    pool = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota"]
    rng = corpus.seeded_rng(1)
    tokenizer = WordTokenizer()
    for n in (1, 5, 40):
        text = corpus.make_prompt(tokenizer, n, rng, pool)
        assert len(tokenizer.encode(text)) == n
        assert text.split()[0] in " ".join(pool)


def test_tools_go_to_chat_only_and_end_with_their_call() -> None:
    profile = parse_profile(
        {
            "buckets": [{"prompt_tokens": 8, "concurrency": 1, "max_tokens": 4}],
            "features": {"use": ["tools"]},
        }
    )
    batches = corpus.Corpus(profile, WordTokenizer(), "m").round_batches(profile.buckets[0], 1)
    assert [str(b.kind) for b in batches] == ["chat-stream+tools"]
    assert "ignore_eos" not in batches[0].requests[0].body


def test_prompt_forms_send_token_ids_and_batches_to_completions_only() -> None:
    profile = parse_profile(
        {
            "endpoints": ["completions", "chat"],
            "buckets": [{"prompt_tokens": 12, "concurrency": 2, "max_tokens": 4}],
            "features": {"use": ["greedy", "token_ids", "prompt_batch"], "prompt_batch": 3},
        }
    )
    tokenizer = CharTokenizer()
    sweep = corpus.Corpus(profile, tokenizer, "m").sweep_requests(profile.buckets[0], 1)
    kinds = {str(r.kind) for r in sweep}
    # the chat endpoint takes messages: neither form is one of its kinds
    assert {k for k in kinds if "+" in k} == {
        "completions+token_ids", "completions-stream+token_ids",
        "completions+prompt_batch", "completions-stream+prompt_batch",
    }  # fmt: skip
    by_kind: dict[str, list[object]] = {}
    for request in sweep:
        by_kind.setdefault(str(request.kind), []).append(request.body.get("prompt"))
    for ids in by_kind["completions+token_ids"]:  # a sweep's length, as token IDs
        assert isinstance(ids, list) and len(ids) == 4 and all(isinstance(i, int) for i in ids)
    batches = by_kind["completions+prompt_batch"]
    assert len(batches) == 2  # the bucket's concurrency: two requests of three prompts each
    for batch in batches:
        assert isinstance(batch, list) and len(batch) == 3 and len(set(batch)) == 3
        assert all(len(tokenizer.encode(text)) == 4 for text in batch)
    # each form is what coverage recognises it as
    assert features.in_body({"prompt": by_kind["completions+token_ids"][0]}) == {"token_ids"}
    assert features.in_body({"prompt": batches[0]}) == {"prompt_batch"}


def test_three_batches_a_round_once_a_window_fails_unmeasured_but_not_for_a_step() -> None:
    rule = Rule()  # window 3, spread 15 %, the drift test's 1 %
    sampled = [corpus.sampled_batches(check([[v] for v in series], rule)) for series in (
        [1.0, 1.0],  # settling: one batch
        [1.0, 1.5, 1.0],  # the spread failed, no noise measured: measure it
        [57.31, 80.94, 80.37],  # a step: all but the oldest agree, the next window says
        [57.31, 80.94, 60.0],  # the newest too far: measure the noise
        [80.61, 81.1, 81.51],  # up 1.1 % in two steps, by chance or a drift: one more round
        [80.61, 81.1, 81.51, 81.9],  # the fourth round went on up: now measure the noise
    )]  # fmt: skip
    assert sampled == [1, MIN_ROUND_SAMPLES, 1, MIN_ROUND_SAMPLES, 1, MIN_ROUND_SAMPLES]
    assert corpus.sampled_batches(None) == 1


def _prompts(batches: list[corpus.Batch]) -> list[object]:
    return [r.body.get("prompt") or r.body["messages"] for b in batches for r in b.requests]


@pytest.mark.parametrize("metric", ["tpot", "ttft", "e2e"])
def test_rounds_after_the_first_warm_one_send_its_prompts_again_only_to_measure_decode(
    metric: str,
) -> None:
    profile = PROFILE.model_copy(update={"convergence": Rule.model_validate({"metric": metric})})
    requests = corpus.Corpus(profile, WordTokenizer(), "m", salt="s")
    bucket = profile.buckets[0]
    by_round = {n: _prompts(requests.round_batches(bucket, n)) for n in range(1, 6)}
    noise = _prompts(requests.round_batches(bucket, 4, repeat=2))  # a round's extra batch
    # the cold round and the first warm one: prompts never sent, their prefill measured
    assert requests.prompts_of(1) is None and requests.prompts_of(2) is None
    assert set(map(str, by_round[1])).isdisjoint(map(str, by_round[2]))
    assert len(set(map(str, by_round[2]))) == bucket.concurrency  # a batch's differ
    if metric == "tpot":  # later rounds only wait for decode: round 2's prompts, cached
        assert [requests.prompts_of(n) for n in (3, 4, 5)] == [2, 2, 2]
        assert by_round[3] == by_round[4] == by_round[5] == noise == by_round[2]
    else:  # every round measures the prefill
        assert [requests.prompts_of(n) for n in (3, 4, 5)] == [None] * 3
        seen = [str(p) for n in range(1, 6) for p in by_round[n]] + list(map(str, noise))
        assert len(set(seen)) == len(seen)
    # the sweep and the check after the last round are never a round's prompts again
    sweep = [
        str(r.body.get("prompt") or r.body["messages"]) for r in requests.sweep_requests(bucket, 5)
    ]
    assert set(sweep).isdisjoint(str(p) for n in range(1, 6) for p in by_round[n])
