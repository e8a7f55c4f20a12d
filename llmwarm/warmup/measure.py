"""Send one warm-up request (or a batch at once) and time it as a client sees it.

Used by the warm-up (in its client process: `llmwarm.warmup.client`) and by `llmwarm bench`; HTTP
only, no vLLM. The client is aiohttp's, as in vLLM's own serving benchmark: at 128 streams
httpx's pure-Python stream parsing and connection pool took 3.5 times its CPU, on a host where
the client shares the cores with the server it measures.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import aiohttp

from llmwarm.errors import WarmupError
from llmwarm.model.corpus import WarmRequest
from llmwarm.model.endpoints import SPECS, Usage, failed
from llmwarm.model.report import Sample

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


@dataclass(frozen=True)
class Ticks:
    """A streamed answer's decode, as its text events arrived; `tokens` output tokens of one of
    its sequences (an event may carry several). An event that only shows the answer began (chat's
    role chunk, Anthropic's `message_start`) is its TTFT, not one of these: between it and the
    first text lies no output token, so counting that gap would spread a token's share of the
    decode over it."""

    times: Sequence[float]
    tokens: float

    def tpot(self, since: float | None = None) -> float | None:
        """Time per output token after the first (None where the stream tells no decode time:
        one token, or all of it in one event). `since`: from the first event at or after that
        moment, when at least one gap follows it."""
        times = self.times
        if len(times) < 2 or self.tokens <= 1:
            return None
        per_gap = (self.tokens - 1) / (len(times) - 1)  # tokens an event brings, on average
        start = 0 if since is None else bisect.bisect_left(times, since)
        if start >= len(times) - 1:
            start = 0
        return (times[-1] - times[start]) / ((len(times) - 1 - start) * per_gap)


def aligned(samples: Sequence[Sample], ticks: Sequence[Ticks | None]) -> list[Sample]:
    """A batch's time per output token from the moment all its streams had their first token:
    the batch decoding side by side, at its concurrency. Requests sent at once reach the engine
    a few milliseconds apart, and the first may have its first token before the second's
    prefill step: that step, in the first's time per token, is another request's prefill, not
    its decode, and whether it lands there is the race of their arrival, round after round at
    random (docs/benchmarks.md, "Figures behind the defaults"). The first decode step at the
    batch's size is after that moment, so a cold one still counts."""
    firsts = [t.times[0] for t in ticks if t is not None and t.times]
    if len(firsts) < 2:
        return list(samples)
    since = max(firsts)
    return [
        s if t is None or s.tpot_s is None else s.model_copy(update={"tpot_s": t.tpot(since)})
        for s, t in zip(samples, ticks, strict=True)
    ]


async def _streamed(
    session: aiohttp.ClientSession, req: WarmRequest, on_wire: _OnWire
) -> tuple[Sample, Ticks]:
    endpoint = SPECS[req.endpoint]
    first: float | None = None  # the first token's arrival: where TTFT stops
    times: list[float] = []  # when each event with output text came (it may hold several)
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
            token = endpoint.has_token(event)
            if token or (first is None and endpoint.starts(event)):
                now = time.perf_counter()
                if first is None:
                    first = now
                if token:
                    times.append(now)
            prompt, output = endpoint.usage(event)
            prompt_tokens = prompt if prompt is not None else prompt_tokens
            output_tokens = output if output is not None else output_tokens
    end = time.perf_counter()
    # Time per token after the first: from the first to the last text event, over a sequence's
    # tokens after the first (its sequences, `n` a prompt and each prompt of a batch, decode
    # side by side). One event with all the text (coalesced) tells no decode time at all.
    ticks = Ticks(times, output_tokens / req.sequences if output_tokens else 0)
    ttft = None if first is None else first - start
    return _sample(req, on_wire, end - start, (prompt_tokens, output_tokens), ttft, ticks), ticks


async def _unary(
    session: aiohttp.ClientSession, req: WarmRequest, on_wire: _OnWire
) -> tuple[Sample, None]:
    start = time.perf_counter()
    async with session.post(
        req.path, json=req.body, headers=req.headers, trace_request_ctx=on_wire
    ) as resp:
        raw = await resp.read()
    end = time.perf_counter()
    if resp.status != 200:
        text = raw.decode(errors="replace")[:300]
        raise _fail(req, f"HTTP {resp.status}: {text}", resp.status)
    usage = SPECS[req.endpoint].usage(_json(req, raw, "the answer"))
    return _sample(req, on_wire, end - start, usage), None


def _sample(
    req: WarmRequest,
    on_wire: _OnWire,
    e2e_s: float,
    usage: Usage,
    ttft_s: float | None = None,
    ticks: Ticks | None = None,
) -> Sample:
    """One request's sample: a stream's TTFT and decode ticks, a unary answer's end only."""
    return Sample(
        kind=req.kind,
        ttft_s=ttft_s,
        tpot_s=ticks.tpot() if ticks is not None else None,
        e2e_s=e2e_s,
        prompt_tokens=usage[0],
        output_tokens=usage[1],
        in_flight=on_wire.count,
    )


async def _send(
    session: aiohttp.ClientSession, req: WarmRequest, wire: Wire
) -> tuple[Sample, Ticks | None]:
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
    return (await _measure(session, req, wire or Wire()))[0]


async def _measure(
    session: aiohttp.ClientSession, req: WarmRequest, wire: Wire
) -> tuple[Sample, Ticks | None]:
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
    """Send requests at once; all their samples (time per token `aligned`), or the first
    failure (the others cancelled, so none of them runs on into what is measured next)."""
    wire = Wire()
    tasks = [asyncio.create_task(_measure(session, r, wire)) for r in requests]
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
    samples, ticks = zip(*(task.result() for task in tasks), strict=True) if tasks else ((), ())
    return aligned(samples, ticks)
