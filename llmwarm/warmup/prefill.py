"""The prefill sweep: a prompt of each prefill token count the engine schedules, then one decode
step over it (two output tokens), once, before the buckets.

A prefill step's cost depends on how many tokens it holds, and so does what a cold engine
builds for it the first time: on CPU, oneDNN makes a primitive per matmul shape; on GPU, a
step past the largest captured CUDA graph runs eager and Triton/cuBLAS tune per shape. The
buckets reach a few counts; a user's prompt falls anywhere between them. One request per count
(alone, then `batched` at once: a step of several prompts) pays each count's one-time cost at
the price of a prefill, where a bucket's rounds pay decode. Its second token is one decode step
attending over that context: a decode step over a longer context than any earlier bucket had was
the next bucket's round-1 cost, paid over several of its rounds; one step per count costs about
a decode step's time (docs/benchmarks.md, "Figures behind the defaults"). The longest count
leaves room for one token only, and a user's prompt of that length can never decode either.

That one-time cost is milliseconds, and a prefill's own cost grows with its tokens: on a GPU
every count takes milliseconds, on a CPU a long prompt takes seconds and hides it. So the
sweep climbs from the shortest count and sends a count only if, at the last count's time a
token, it would end within `max_share` of the engine's start time: the counts where a
one-time cost shows come first.

    fit.prefill_counts(prefill, shape, endpoint)   the counts (what fits the engine)
    sweep(client, requests, shape, start_s)        send them; a `PrefillResult`
"""

from __future__ import annotations

import asyncio
from time import perf_counter

from llmwarm.model.corpus import Corpus
from llmwarm.model.fit import EngineShape, prefill_counts, prefill_room
from llmwarm.model.kinds import Kind
from llmwarm.model.profile import Bucket
from llmwarm.model.report import PrefillResult
from llmwarm.warmup.client import Client

# The prefill's token, then one decode step attending over the prompt.
OUTPUT_TOKENS = 2


async def sweep(
    client: Client, requests: Corpus, shape: EngineShape, start_s: float
) -> PrefillResult | None:
    """Send the sweep through the profile's first endpoint (plain requests, `OUTPUT_TOKENS` each
    where the context has room), shortest count first: each alone, then as `batched` requests
    at once sharing it (each at least `min_tokens`), while the next count, taking at least as
    long a token as the last, would keep the sweep within `max_share` of `start_s` (the
    engine's start time); the counts left are cut."""
    prefill = requests.profile.prefill
    if prefill is None:
        return None
    kind = Kind(requests.profile.endpoint_names()[0])
    counts = prefill_counts(prefill, shape, kind.endpoint)
    if not counts:  # --max-num-batched-tokens below `min_tokens`, and no room past it
        return None
    limit = None if prefill.max_share is None else prefill.max_share * start_s
    room = prefill_room(shape, kind.endpoint) + 1  # a prompt and its output tokens
    widths = [1] + ([prefill.batched] if prefill.batched > 1 else [])
    start, sent = perf_counter(), 0
    swept: list[int] = []
    per_token = 0.0  # the last count's seconds a token: a longer count takes at least as long
    for tokens in counts:
        began = perf_counter()
        if limit is not None and swept and began - start + per_token * tokens > limit:
            break
        for round_, width in enumerate(widths, 1):
            prompt = tokens // width
            if prompt < prefill.min_tokens:
                continue
            output = min(OUTPUT_TOKENS, room - prompt)  # a count is at most `prefill_room`
            bucket = Bucket(
                prompt_tokens=prompt, concurrency=width, max_tokens=output, name="prefill"
            )
            batch = await asyncio.to_thread(requests.batch, bucket, kind, round_, tokens)
            sent += len(await client.measure_all(batch.requests))
        swept.append(tokens)
        per_token = (perf_counter() - began) / tokens
    return PrefillResult(
        token_counts=swept,
        batched=prefill.batched,
        cut=counts[len(swept) :],
        requests=sent,
        seconds=perf_counter() - start,
    )
