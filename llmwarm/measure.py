"""Send one warm-up request (or a batch at once) and time it as a client sees it.

Used by the warm-up and by `llmwarm bench`; HTTP only, no vLLM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx

from llmwarm.corpus import WarmRequest
from llmwarm.endpoints import SPECS, failed
from llmwarm.errors import WarmupError
from llmwarm.report import Sample

# A cold engine may compile for a long time before its first token; never give up on that.
logger = logging.getLogger(__name__)

TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=600.0)
# No cap on connections: httpx's default (100) would hold a bucket of 256 to 100 in flight.
LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=None)


class Wire:
    """How many requests of one batch are on the wire at once, as httpcore traces them: from
    sending a request's headers to its response's close. A request still waiting for a pooled
    connection is not on the wire, so this is what the server really had in flight."""

    def __init__(self) -> None:
        self.now = 0

    def tracer(self) -> tuple[list[int], Callable[[str, Any], Awaitable[None]]]:
        """For one request: a cell that will hold the count when it went on the wire (itself
        included), and the httpcore trace callback that fills it."""
        seen: list[int] = []

        async def trace(event: str, info: Any) -> None:
            if event.endswith(".send_request_headers.started"):
                self.now += 1
                seen.append(self.now)
            elif event.endswith((".response_closed.complete", ".response_closed.failed")):
                self.now -= 1

        return seen, trace


# vLLM answers a request-level internal error (finish_reason "error": a multimodal cache that
# drifted between its frontend and its engine, a KV load failure) with 500 or 503 and expects
# the client to send the request again; its frontend has repaired its state by then.
RETRY_STATUSES = (500, 503)


class _Retryable(WarmupError):
    """A failure vLLM asks a client to retry (once)."""


def _fail(req: WarmRequest, what: str, status: Any = None) -> WarmupError:
    kind = _Retryable if status in RETRY_STATUSES else WarmupError
    return kind(
        f"warm-up request failed: {req.kind} {req.path} (bucket {req.bucket}, round {req.round})",
        problems=[(f"bucket {req.bucket}", what)],
    )


def _json(req: WarmRequest, text: str, what: str) -> dict[str, Any]:
    """A JSON object from the server, or a `WarmupError` saying what came instead (a proxy's
    HTML error page, a server that is not vLLM)."""
    try:
        data = json.loads(text)
    except ValueError:
        raise _fail(req, f"{what} is not JSON: {text[:200]!r}") from None
    if not isinstance(data, dict):
        raise _fail(req, f"{what} is not a JSON object: {text[:200]!r}")
    return data


async def _streamed(client: httpx.AsyncClient, req: WarmRequest, wire: Wire) -> Sample:
    endpoint = SPECS[req.endpoint]
    sent, trace = wire.tracer()
    first = last = None  # the first token's arrival, the last text event's
    events = 0  # events that carried output text (a server may send several tokens in one)
    prompt_tokens = output_tokens = None
    start = time.perf_counter()
    async with client.stream("POST", req.path, json=req.body, extensions={"trace": trace}) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode(errors="replace")[:300]
            raise _fail(req, f"HTTP {resp.status_code}: {body}", resp.status_code)
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank lines, `event:` names (the event's data says its type too)
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = _json(req, data, "a stream event")
            if (error := failed(event)) is not None:
                code = error.get("code") if isinstance(error, dict) else None
                raise _fail(req, f"error in stream: {error}", code)
            now = time.perf_counter()
            if first is None and endpoint.starts(event):
                first = now
            if endpoint.has_token(event):
                first = first if first is not None else now
                last = now
                events += 1
            prompt, output = endpoint.usage(event)
            prompt_tokens = prompt if prompt is not None else prompt_tokens
            output_tokens = output if output is not None else output_tokens
    end = time.perf_counter()
    tpot = None
    # Time per token after the first: from the first to the last text event, over the tokens
    # after the first. One event with all the text (coalesced) tells no decode time at all.
    if (
        first is not None
        and last is not None
        and events > 1
        and output_tokens
        and output_tokens > 1
    ):
        tpot = (last - first) / (output_tokens - 1)
    return Sample(
        kind=req.kind,
        ttft_s=None if first is None else first - start,
        tpot_s=tpot,
        e2e_s=end - start,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        in_flight=sent[0] if sent else None,
    )


async def _unary(client: httpx.AsyncClient, req: WarmRequest, wire: Wire) -> Sample:
    sent, trace = wire.tracer()
    start = time.perf_counter()
    resp = await client.post(req.path, json=req.body, extensions={"trace": trace})
    end = time.perf_counter()
    if resp.status_code != 200:
        raise _fail(req, f"HTTP {resp.status_code}: {resp.text[:300]}", resp.status_code)
    prompt_tokens, output_tokens = SPECS[req.endpoint].usage(_json(req, resp.text, "the answer"))
    return Sample(
        kind=req.kind,
        ttft_s=None,
        tpot_s=None,
        e2e_s=end - start,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        in_flight=sent[0] if sent else None,
    )


async def _send(client: httpx.AsyncClient, req: WarmRequest, wire: Wire) -> Sample:
    try:
        return await (_streamed(client, req, wire) if req.stream else _unary(client, req, wire))
    except httpx.HTTPError as exc:
        raise _fail(req, f"{type(exc).__name__}: {exc}") from None


async def measure(client: httpx.AsyncClient, req: WarmRequest, wire: Wire | None = None) -> Sample:
    """Send one request and time it from the client's side (`wire`: the batch it is part of).
    A failure vLLM asks a client to retry is sent once more (its sample is the second's)."""
    wire = wire or Wire()
    try:
        return await _send(client, req, wire)
    except _Retryable as exc:
        logger.warning(
            "%s: %s; sending it again, as vLLM asks of a client", exc.message, exc.problems[0][1]
        )
    try:
        return await _send(client, req, wire)
    except _Retryable as exc:
        raise WarmupError(exc.message, problems=exc.problems) from None


async def measure_all(client: httpx.AsyncClient, requests: Sequence[WarmRequest]) -> list[Sample]:
    """Send requests at once; all their samples, or the first failure (the others cancelled,
    so none of them runs on into what is measured next)."""
    wire = Wire()
    tasks = [asyncio.create_task(measure(client, r, wire)) for r in requests]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        pending = [t for t in tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
    for task in tasks:
        if not task.cancelled() and (exc := task.exception()) is not None:
            for other in tasks:  # retrieved: a sibling's failure beside the first
                if other is not task and not other.cancelled():
                    other.exception()
            raise exc
    return [task.result() for task in tasks]
