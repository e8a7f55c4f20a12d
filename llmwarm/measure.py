"""Send one warm-up request (or a batch at once) and time it as a client sees it.

Used by the warm-up (in its client process: `llmwarm.client`) and by `llmwarm bench`; HTTP
only, no vLLM. The client is aiohttp's, as in vLLM's own serving benchmark: at 128 streams
httpx's pure-Python stream parsing and connection pool took 3.5 times its CPU, on a host where
the client shares the cores with the server it measures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import aiohttp

from llmwarm.corpus import WarmRequest
from llmwarm.endpoints import SPECS, failed
from llmwarm.errors import WarmupError
from llmwarm.report import Sample

logger = logging.getLogger(__name__)

# A cold engine may compile for a long time before its first token; never give up on that.
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)


def session(base_url: str, headers: dict[str, str] | None = None) -> aiohttp.ClientSession:
    """A client of `base_url` for `measure` and `measure_all`: no cap on connections (a
    bucket of 256 has 256 in flight), each request's time on the wire traced (`Wire`)."""
    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(_headers_sent)
    return aiohttp.ClientSession(
        base_url=base_url, headers=headers, timeout=TIMEOUT, trace_configs=[trace],
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
    )  # fmt: skip


async def _headers_sent(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: Any
) -> None:
    if isinstance(on_wire := context.trace_request_ctx, _OnWire):
        on_wire.sent()


class Wire:
    """How many requests of one batch are on the wire at once: from sending a request's
    headers to its response's end. A request still opening its connection is not on the wire,
    so this is what the server really had in flight."""

    def __init__(self) -> None:
        self.now = 0

    def request(self) -> _OnWire:
        return _OnWire(self)


class _OnWire:
    """One request's time on its batch's wire: `count` is how many were on it when it went
    on (itself included)."""

    def __init__(self, wire: Wire) -> None:
        self.wire, self.on = wire, False
        self.count: int | None = None

    def sent(self) -> None:
        self.wire.now += 1
        self.on, self.count = True, self.wire.now

    def done(self) -> None:
        if self.on:
            self.wire.now -= 1
            self.on = False


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


def _json(req: WarmRequest, raw: bytes, what: str) -> dict[str, Any]:
    """A JSON object from the server, or a `WarmupError` saying what came instead (a proxy's
    HTML error page, a server that is not vLLM)."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise _fail(req, f"{what} is not JSON: {raw[:200]!r}") from None
    if not isinstance(data, dict):
        raise _fail(req, f"{what} is not a JSON object: {raw[:200]!r}")
    return data


async def _streamed(session: aiohttp.ClientSession, req: WarmRequest, on_wire: _OnWire) -> Sample:
    endpoint = SPECS[req.endpoint]
    first = last = None  # the first token's arrival, the last text event's
    events = 0  # events that carried output text (a server may send several tokens in one)
    prompt_tokens = output_tokens = None
    start = time.perf_counter()
    async with session.post(
        req.path, json=req.body, headers=req.headers, trace_request_ctx=on_wire
    ) as resp:
        if resp.status != 200:
            body = (await resp.read()).decode(errors="replace")[:300]
            raise _fail(req, f"HTTP {resp.status}: {body}", resp.status)
        async for line in resp.content:  # one line at a time, as it arrives
            if not line.startswith(b"data:"):
                continue  # blank lines, `event:` names (the event's data says its type too)
            data = line[5:].strip()
            if data == b"[DONE]":
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
    # Time per token after the first: from the first to the last text event, over a sequence's
    # tokens after the first (its sequences, `n` a prompt and each prompt of a batch, decode
    # side by side). One event with all the text (coalesced) tells no decode time at all.
    per_sequence = output_tokens / req.sequences if output_tokens else 0
    if first is not None and last is not None and events > 1 and per_sequence > 1:
        tpot = (last - first) / (per_sequence - 1)
    return Sample(
        kind=req.kind,
        ttft_s=None if first is None else first - start,
        tpot_s=tpot,
        e2e_s=end - start,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        in_flight=on_wire.count,
    )


async def _unary(session: aiohttp.ClientSession, req: WarmRequest, on_wire: _OnWire) -> Sample:
    start = time.perf_counter()
    async with session.post(
        req.path, json=req.body, headers=req.headers, trace_request_ctx=on_wire
    ) as resp:
        raw = await resp.read()
    end = time.perf_counter()
    if resp.status != 200:
        text = raw.decode(errors="replace")[:300]
        raise _fail(req, f"HTTP {resp.status}: {text}", resp.status)
    prompt_tokens, output_tokens = SPECS[req.endpoint].usage(_json(req, raw, "the answer"))
    return Sample(
        kind=req.kind,
        ttft_s=None,
        tpot_s=None,
        e2e_s=end - start,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        in_flight=on_wire.count,
    )


async def _send(session: aiohttp.ClientSession, req: WarmRequest, wire: Wire) -> Sample:
    on_wire = wire.request()
    try:
        if req.stream:
            return await _streamed(session, req, on_wire)
        return await _unary(session, req, on_wire)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:  # ValueError: a
        # line longer than aiohttp's reader takes
        raise _fail(req, f"{type(exc).__name__}: {exc}") from None
    finally:
        on_wire.done()


async def measure(
    session: aiohttp.ClientSession, req: WarmRequest, wire: Wire | None = None
) -> Sample:
    """Send one request and time it from the client's side (`wire`: the batch it is part of).
    A failure vLLM asks a client to retry is sent once more (its sample is the second's)."""
    wire = wire or Wire()
    try:
        return await _send(session, req, wire)
    except _Retryable as exc:
        logger.warning(
            "%s: %s; sending it again, as vLLM asks of a client", exc.message, exc.problems[0][1]
        )
    try:
        return await _send(session, req, wire)
    except _Retryable as exc:
        raise WarmupError(exc.message, problems=exc.problems) from None


async def measure_all(
    session: aiohttp.ClientSession, requests: Sequence[WarmRequest]
) -> list[Sample]:
    """Send requests at once; all their samples, or the first failure (the others cancelled,
    so none of them runs on into what is measured next)."""
    wire = Wire()
    tasks = [asyncio.create_task(measure(session, r, wire)) for r in requests]
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
