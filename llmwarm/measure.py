"""Send one warm-up request (or a batch at once) and time it as a client sees it.

Used by the warm-up and by `llmwarm bench`; HTTP only, no vLLM.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import httpx

from llmwarm.corpus import WarmRequest
from llmwarm.errors import WarmupError
from llmwarm.report import Sample

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
