"""The sampler's compiled variants that a sweep, sent at once, cannot reach.

vLLM's GPU sampler compiles its log-probability kernel per width, the next power of two of
1 + the largest count in a step (`model.features.logprob_classes`): `top_logprobs` for the
sampled tokens, and `prompt_logprobs` for a prompt's, which go through the same kernel
(`vllm/v1/worker/gpu/sample/prompt_logprob.py`, `compute_topk_scores`). A sweep's requests share
their steps, so the step's largest count decides the one width they compile; a user who asks 1
or 12 where the warm-up asked 5 compiles another. So after the sweep, one short request per
width and per feature the profile warms, one at a time, each alone in its steps. On the CPU
build the sampler is PyTorch's and compiles nothing per width: there these are a few short
requests.

The sampler's other kernels (penalties, min-p, logit bias and allowed tokens, bad words, the
fused top-k/top-p sampler, the seeded Gumbel sampler) take no compile-time value from a request:
each compiles once, reached by vLLM's own sampler warm-up (`SamplingParams.for_sampler_warmup`)
or by the warm-up's `sampling` and `penalties` kinds (docs/gpu.md).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Literal

from llmwarm.model.corpus import SWEEP_MAX_TOKENS, SWEEP_PROMPT_TOKENS, Corpus, kinds
from llmwarm.model.features import logprob_classes
from llmwarm.model.fit import EngineShape
from llmwarm.model.kinds import Kind
from llmwarm.warmup.client import Client

# The features whose count sets a kernel width; each is also the `Features` field of the count.
WidthFeature = Literal["logprobs", "prompt_logprobs"]
WIDTH_FEATURES: tuple[WidthFeature, ...] = ("logprobs", "prompt_logprobs")


def width_kind(requests: Corpus, feature: WidthFeature = "logprobs") -> Kind | None:
    """The first bucket's first kind with `feature`, unstreamed if it has one; None when the
    profile does not warm it."""
    if not requests.profile.buckets:
        return None
    found = [
        k for k in kinds(requests.profile, requests.profile.buckets[0])
        if k.feature.name == feature
    ]  # fmt: skip
    return min(found, key=lambda k: k.stream, default=None)


async def send_logprob_classes(
    client: Client, requests: Corpus, shape: EngineShape
) -> dict[WidthFeature, list[int]]:
    """For each width feature the profile warms, one request per width the engine allows (up
    to --max-logprobs, which bounds both), one after another; the counts sent, by feature."""
    bucket = requests.profile.buckets[0].model_copy(
        update={"max_tokens": SWEEP_MAX_TOKENS, "prompt_tokens": SWEEP_PROMPT_TOKENS,
                "concurrency": 1, "name": "logprobs"}
    ) if requests.profile.buckets else None  # fmt: skip
    sent: dict[WidthFeature, list[int]] = {}
    for feature in WIDTH_FEATURES:
        kind = width_kind(requests, feature)
        if kind is None or bucket is None:
            continue
        sent[feature] = []
        for count in logprob_classes(shape.max_logprobs):
            features = requests.profile.features.model_copy(update={feature: count})
            profile = requests.profile.model_copy(update={"features": features})
            batch = await asyncio.to_thread(
                replace(requests, profile=profile).batch, bucket, kind, 1, count
            )
            await client.measure_all(batch.requests)
            sent[feature].append(count)
    return sent
