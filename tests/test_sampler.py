"""The sampler's log-probability widths (`llmwarm.warmup.sampler`): one request per width vLLM's
GPU sampler compiles, each alone, up to --max-logprobs, for `logprobs` and `prompt_logprobs`;
and the width rule read from vLLM's own source, so a vLLM that changes it fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from llmwarm.model.corpus import Corpus, WordTokenizer
from llmwarm.model.features import UNLIMITED_LOGPROBS, logprob_classes
from llmwarm.model.fit import EngineShape
from llmwarm.model.profile import parse_profile
from llmwarm.warmup.sampler import send_logprob_classes
from tests.fakes import ScriptedClient


def width(count: int) -> int:
    """The kernel width vLLM's GPU sampler compiles for a step whose largest count is this."""
    return 1 << count.bit_length()  # next power of two of 1 + count


def _corpus(endpoints: list[str], use: list[str]) -> Corpus:
    profile = parse_profile(
        {
            "endpoints": endpoints,
            "buckets": [{"prompt_tokens": 16, "concurrency": 2, "max_tokens": 8}],
            "features": {"use": use},
        }
    )
    return Corpus(profile, WordTokenizer(), "m")


def _shape(max_logprobs: int) -> EngineShape:
    return EngineShape(
        max_model_len=512, max_num_seqs=4, max_num_batched_tokens=512, max_logprobs=max_logprobs
    )


def test_vllms_default_limit_has_six_widths() -> None:
    assert logprob_classes(20) == [0, 1, 3, 7, 15, 20]
    assert logprob_classes(-1) == logprob_classes(UNLIMITED_LOGPROBS)
    assert logprob_classes(0) == [0]


@given(st.integers(min_value=0, max_value=4096))
def test_every_count_a_user_may_ask_has_its_width_sent_once(limit: int) -> None:
    counts = logprob_classes(limit)
    assert all(0 <= c <= limit for c in counts)
    assert len({width(c) for c in counts}) == len(counts)  # no width twice
    assert {width(k) for k in range(limit + 1)} == {width(c) for c in counts}


async def test_each_width_is_sent_alone_one_request_after_another() -> None:
    client = ScriptedClient(lambda batch: 0.01)
    widths = await send_logprob_classes(client, _corpus(["chat"], ["logprobs"]), _shape(20))
    sent = widths["logprobs"]
    assert widths == {"logprobs": [0, 1, 3, 7, 15, 20]}
    # alone in its steps: a step's largest count decides the width it compiles
    assert [len(batch) for batch in client.sent] == [1] * 6
    bodies = [batch[0].body for batch in client.sent]
    assert [b["top_logprobs"] for b in bodies] == sent and all(b["logprobs"] for b in bodies)
    assert all(not b.get("stream") and b["max_tokens"] <= 2 for b in bodies)


async def test_completions_ask_their_counts_as_logprobs_within_max_logprobs() -> None:
    client = ScriptedClient(lambda batch: 0.01)
    widths = await send_logprob_classes(client, _corpus(["completions"], ["logprobs"]), _shape(5))
    sent = widths["logprobs"]
    assert sent == [0, 1, 3, 5]
    assert [batch[0].body["logprobs"] for batch in client.sent] == sent


async def test_no_logprobs_in_the_profile_sends_nothing() -> None:
    client = ScriptedClient(lambda batch: 0.01)
    assert await send_logprob_classes(client, _corpus(["chat"], ["stop"]), _shape(20)) == {}
    assert client.sent == []


async def test_prompt_logprobs_are_sent_at_each_width_too() -> None:
    # The defect: a prompt's log-probabilities go through the same width-specialised kernel
    # (`compute_topk_scores`), and the warm-up sent one count (the profile's), so a user asking
    # another class of `prompt_logprobs` compiled on first use.
    client = ScriptedClient(lambda batch: 0.01)
    corpus = _corpus(["completions"], ["logprobs", "prompt_logprobs"])
    widths = await send_logprob_classes(client, corpus, _shape(20))
    assert widths == {"logprobs": [0, 1, 3, 7, 15, 20], "prompt_logprobs": [0, 1, 3, 7, 15, 20]}
    bodies = [batch[0].body for batch in client.sent]
    assert [b["prompt_logprobs"] for b in bodies if "prompt_logprobs" in b] == [0, 1, 3, 7, 15, 20]
    assert [len(batch) for batch in client.sent] == [1] * 12


def test_the_width_rule_is_vllms() -> None:
    # vLLM's GPU sampler (v2 model runner): 1 + the step's largest count, to the next power of
    # two, is the kernel's compile-time width. Read from the installed source (its import needs
    # Triton's GPU backend).
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin is not None
    sample = Path(spec.origin).parent / "v1" / "worker" / "gpu" / "sample"
    logprob = (sample / "logprob.py").read_text()
    assert "topk_block_size = min(triton.next_power_of_2(num_logprobs), _MAX_TOPK_BLOCK)" in logprob
    assert "TOPK_BLOCK_SIZE=topk_block_size" in logprob
    # a prompt's log-probabilities take the same kernel
    prompt = (sample / "prompt_logprob.py").read_text()
    assert "result = compute_topk_scores(" in prompt
    assert "scores = compute_token_logprobs(logits, logprob_token_ids)" in logprob
    shard = (sample / "batch_shard.py").read_text()
    assert "num_logprob_cols = 1 + max(num_logprobs, max_token_ids)" in shard


def test_the_sampler_kernels_audit_holds_for_the_installed_vllm() -> None:
    # docs/gpu.md: no other sampler kernel takes a compile-time value from a request, and vLLM's
    # own sampler warm-up reaches each once. A vLLM that changes either fails here.
    from vllm import SamplingParams

    warm = SamplingParams.for_sampler_warmup()
    assert warm.temperature > 0 and warm.seed is None  # the fused top-k/top-p sampler's step
    assert warm.top_p < 1 and warm.top_k > 0 and warm.min_p > 0 and warm.min_tokens > 0
    assert warm.presence_penalty and warm.frequency_penalty and warm.repetition_penalty != 1
    assert warm.logit_bias and warm._bad_words_token_ids
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin is not None
    sample = Path(spec.origin).parent / "v1" / "worker" / "gpu" / "sample"
    bias = (sample / "logit_bias.py").read_text()
    fixed = [
        "MAX_NUM_ALLOWED_TOKEN_IDS = 1024",
        "MAX_NUM_LOGIT_BIAS_TOKENS = 1024",
        "MAX_NUM_STOP_TOKEN_IDS = 128",
        "(max_num_reqs, MAX_NUM_LOGIT_BIAS_TOKENS)",
    ]
    for line in fixed:
        assert line in bias  # the block size comes from these fixed widths, not a request's
    for name in ("penalties.py", "min_p.py"):
        assert "next_power_of_2" not in (sample / name).read_text()  # fixed block sizes
