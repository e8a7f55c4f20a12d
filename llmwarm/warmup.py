"""Run the warm-up corpus over HTTP and measure each request as a client sees it."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from llmwarm import convergence, corpus
from llmwarm.corpus import WarmRequest
from llmwarm.errors import WarmupError
from llmwarm.profile import Bucket, EngineShape, Profile
from llmwarm.report import BucketResult, KvFillResult, RoundResult, Sample

logger = logging.getLogger(__name__)

# A cold engine may compile for a long time before its first token; never give up on that.
TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=600.0)


def _fail(req: WarmRequest, what: str) -> WarmupError:
    return WarmupError(
        f"warm-up request failed: {req.kind} {req.path} (bucket {req.bucket}, round {req.round})",
        problems=[(f"bucket {req.bucket}", what)],
    )


def _has_token(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


async def _streamed(client: httpx.AsyncClient, req: WarmRequest) -> Sample:
    first = last = None
    usage: dict[str, Any] = {}
    start = time.perf_counter()
    async with client.stream("POST", req.path, json=req.body) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode(errors="replace")[:300]
            raise _fail(req, f"HTTP {resp.status_code}: {body}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise _fail(req, f"error in stream: {chunk['error']}")
            now = time.perf_counter()
            if _has_token(chunk):
                first = first if first is not None else now
                last = now
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    output_tokens = usage.get("completion_tokens")
    tpot = None
    if first is not None and last is not None and output_tokens and output_tokens > 1:
        tpot = (last - first) / (output_tokens - 1)
    return Sample(
        kind=req.kind,
        ttft_s=None if first is None else first - start,
        tpot_s=tpot,
        e2e_s=end - start,
        prompt_tokens=usage.get("prompt_tokens"),
        output_tokens=output_tokens,
    )


async def _unary(client: httpx.AsyncClient, req: WarmRequest) -> Sample:
    start = time.perf_counter()
    resp = await client.post(req.path, json=req.body)
    end = time.perf_counter()
    if resp.status_code != 200:
        raise _fail(req, f"HTTP {resp.status_code}: {resp.text[:300]}")
    usage = resp.json().get("usage") or {}
    return Sample(
        kind=req.kind,
        ttft_s=None,
        tpot_s=None,
        e2e_s=end - start,
        prompt_tokens=usage.get("prompt_tokens"),
        output_tokens=usage.get("completion_tokens"),
    )


async def measure(client: httpx.AsyncClient, req: WarmRequest) -> Sample:
    """Send one request and time it from the client's side."""
    try:
        return await (_streamed(client, req) if req.stream else _unary(client, req))
    except httpx.HTTPError as exc:
        raise _fail(req, f"{type(exc).__name__}: {exc}") from None


async def measure_all(client: httpx.AsyncClient, requests: Sequence[WarmRequest]) -> list[Sample]:
    """Send requests at once; all their samples, or the first failure."""
    return list(await asyncio.gather(*(measure(client, r) for r in requests)))


async def served_adapters(client: httpx.AsyncClient, model: str) -> list[str]:
    """The LoRA adapters the server lists now (`/v1/models` entries with a parent: the base
    model), including those loaded at run time with `/v1/load_lora_adapter`."""
    try:
        resp = await client.get("/v1/models")
        resp.raise_for_status()
        listed = resp.json()["data"]
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        raise WarmupError(
            "cannot list the served LoRA adapters", problems=[("GET /v1/models", str(exc))]
        ) from None
    return [m["id"] for m in listed if m.get("parent") and m["id"] != model]


@dataclass(frozen=True)
class Progress:
    """Where the warm-up is, after each round."""

    bucket_index: int  # 1-based
    buckets: int
    bucket: BucketResult  # live: it grows as later rounds run
    round: int  # the round just done
    requests: int  # sent so far
    bucket_done: bool  # converged, or its last allowed round


@dataclass
class Outcome:
    buckets: list[BucketResult]
    requests: int
    budget_exhausted: bool


async def run(
    client: httpx.AsyncClient,
    profile: Profile,
    tokenizer: corpus.Tokenizer,
    model: str,
    *,
    on_round: Callable[[Progress], None] = lambda progress: None,
) -> Outcome:
    """Warm bucket by bucket, round by round, until each converges (or the limits hit)."""
    rule = profile.convergence
    deadline = profile.budget.max_seconds
    max_requests = profile.budget.max_requests
    start = time.perf_counter()
    results = [
        BucketResult(
            name=b.name,
            prompt_tokens=b.prompt_tokens,
            concurrency=b.concurrency,
            max_tokens=b.max_tokens,
        )
        for b in profile.buckets
    ]
    sent = 0
    budget_exhausted = False
    for index, (bucket, result) in enumerate(zip(profile.buckets, results, strict=True), 1):
        for round_ in range(1, rule.max_rounds + 1):
            out_of_time = deadline is not None and time.perf_counter() - start >= deadline
            out_of_requests = max_requests is not None and sent >= max_requests
            if out_of_time or out_of_requests:
                budget_exhausted = True
                break
            samples: list[Sample] = []
            for batch in corpus.round_batches(profile, bucket, round_, tokenizer, model):
                samples += await measure_all(client, batch.requests)
            sent += len(samples)
            result.rounds.append(RoundResult(round=round_, samples=samples))
            verdict = convergence.check(result.series(rule.metric), rule)
            logger.debug("bucket %s round %d: %s", bucket.name, round_, verdict.reason)
            if verdict.converged:
                result.converged_at = round_
            done = verdict.converged or round_ == rule.max_rounds
            on_round(Progress(index, len(results), result, round_, sent, done))
            if verdict.converged:
                break
        result.stop_reason = (
            "converged" if result.converged else "budget" if budget_exhausted else "max_rounds"
        )
    return Outcome(buckets=results, requests=sent, budget_exhausted=budget_exhausted)


async def fill_kv(
    client: httpx.AsyncClient,
    profile: Profile,
    shape: EngineShape,
    tokenizer: corpus.Tokenizer,
    model: str,
    *,
    on_batch: Callable[[int, int], None] = lambda done, target: None,
) -> KvFillResult | None:
    """Prefill `kv_fill.share` of the KV-cache blocks once, with distinct long prompts.

    Distinct prompts share no prefix, and the prefix cache keeps finished requests' blocks
    until the cache is reset, so every new request lands on blocks not used before.
    """
    fill = profile.kv_fill
    if fill is None or not shape.kv_blocks or not shape.block_size:
        return None
    length = fill.prompt_tokens or min(shape.max_model_len - 8, 4096)
    target = int(fill.share * shape.kv_blocks)
    need_tokens = target * shape.block_size
    width = min(fill.concurrency, shape.max_num_seqs)
    bucket = Bucket(prompt_tokens=length, concurrency=width, max_tokens=1, name="kv-fill")
    kind = corpus.Kind("completions", stream=False)
    start = time.perf_counter()
    prefilled = sent = batches = 0
    while prefilled < need_tokens:
        batches += 1  # each batch its own "round": fresh prompts, no shared prefixes
        batch = corpus.batch(profile, bucket, kind, batches, tokenizer, model)
        samples = await measure_all(client, batch.requests)
        sent += len(samples)
        prefilled += sum(s.prompt_tokens or length for s in samples)
        on_batch(min(target, prefilled // shape.block_size), target)
    return KvFillResult(
        blocks=shape.kv_blocks,
        block_size=shape.block_size,
        target_blocks=target,
        blocks_reached=min(shape.kv_blocks, prefilled // shape.block_size),
        tokens_prefilled=prefilled,
        requests=sent,
        seconds=time.perf_counter() - start,
    )
