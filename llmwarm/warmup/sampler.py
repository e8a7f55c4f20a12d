"""The sampler's compiled variants that a sweep, sent at once, cannot reach.

vLLM's GPU sampler compiles its log-probability kernel per width, the next power of two of
1 + the largest `top_logprobs` in a step (`model.features.logprob_classes`). A sweep's
requests share their steps, so the step's largest count decides the one width they compile;
a user who asks 1 or 12 where the warm-up asked 5 compiles another. So after the sweep, one
short request per width, one at a time, each alone in its steps. On the CPU build the sampler
is PyTorch's and compiles nothing per width: there these are a few short requests.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from llmwarm.model.corpus import SWEEP_MAX_TOKENS, SWEEP_PROMPT_TOKENS, Corpus, kinds
from llmwarm.model.features import logprob_classes
from llmwarm.model.fit import EngineShape
from llmwarm.model.kinds import Kind
from llmwarm.warmup.client import Client


def logprobs_kind(requests: Corpus) -> Kind | None:
    """The first bucket's first kind with the `logprobs` feature, unstreamed if it has one;
    None when the profile warms no log-probabilities."""
    if not requests.profile.buckets:
        return None
    found = [
        k for k in kinds(requests.profile, requests.profile.buckets[0])
        if k.feature.name == "logprobs"
    ]  # fmt: skip
    return min(found, key=lambda k: k.stream, default=None)


async def send_logprob_classes(client: Client, requests: Corpus, shape: EngineShape) -> list[int]:
    """One request per log-probability width the engine allows (up to --max-logprobs), one
    after another; the counts sent."""
    kind = logprobs_kind(requests)
    if kind is None:
        return []
    bucket = requests.profile.buckets[0].model_copy(
        update={"max_tokens": SWEEP_MAX_TOKENS, "prompt_tokens": SWEEP_PROMPT_TOKENS,
                "concurrency": 1, "name": "logprobs"}
    )  # fmt: skip
    sent = []
    for count in logprob_classes(shape.max_logprobs):
        features = requests.profile.features.model_copy(update={"logprobs": count})
        one = replace(requests, profile=requests.profile.model_copy(update={"features": features}))
        batch = await asyncio.to_thread(one.batch, bucket, kind, 1, count)
        await client.measure_all(batch.requests)
        sent.append(count)
    return sent
