"""The readiness gate: 503 + Retry-After until the engine is warm, then vLLM's own app.

An ASGI app that wraps vLLM's. It owns `/ready` (200 only when warm: for readiness probes)
and `/live` (200 in every phase while the process runs: for liveness probes, so a replica is
never restarted for warming). While loading it answers every request itself;
while warming it lets through only llmwarm's own warm-up requests, recognised by a per-process
random token in a header *and* a local peer (loopback, unix socket, or the server's own
address), so no outside client can
forge its way past; once ready it hands every request to vLLM's app. `/metrics` is never
gated: it is read-only, and it shows the warm-up's progress. `/warmup/*` goes to llmwarm's own
endpoints (`llmwarm.control`) in every phase.

The warm-up's own requests (hundreds) come through a private listener of their own, with no
access log (`llmwarm.frontend`); the report counts them. User requests are logged as vLLM logs
them.

With an API key (vLLM's `--api-key`), the probe answers (`/ready`, 503 bodies) say only the
phase to a caller without the key; the warm-up's progress and summary need the key.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import make_asgi_app
from starlette.requests import Request

from llmwarm.access import is_local
from llmwarm.control import PREFIX as CONTROL_PREFIX
from llmwarm.coverage import TAIL_BYTES
from llmwarm.endpoints import BY_PATH, SPECS, FirstToken
from llmwarm.skeleton import Skeleton
from llmwarm.state import Phase, RunState

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

WARMUP_HEADER = "x-llmwarm-warmup"

logger = logging.getLogger(__name__)


# Seconds a client should wait before trying again, by phase: loading takes a minute or
# more, warming tens of seconds.
RETRY_AFTER = {Phase.LOADING: 10, Phase.WARMING: 5, Phase.STOPPING: 5}


def _utf8_headers(scope: Scope) -> Scope:
    """The scope without headers that are not UTF-8: prometheus_client's app decodes them
    (an `Accept` of other bytes, which HTTP allows, would be a 500 on /metrics)."""

    def utf8(raw: bytes) -> bool:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    headers = scope.get("headers", [])
    kept = [(name, value) for name, value in headers if utf8(name) and utf8(value)]
    return scope if len(kept) == len(headers) else {**scope, "headers": kept}


class Gate:
    """The ASGI app that enforces readiness, as the run state says it."""

    def __init__(
        self,
        state: RunState,
        control: ASGIApp | None = None,
        authorized: Callable[[Request], bool] = lambda request: True,
        coverage: bool = True,
    ) -> None:
        self.state = state
        self.coverage = coverage  # record each user request of an endpoint (off: benchmarks)
        self.control = control
        self.authorized = authorized
        self.token = secrets.token_urlsafe(32)
        # Until vLLM's app (and its /metrics) exists, serve the same registry ourselves.
        self.metrics_app: ASGIApp = make_asgi_app()

    @property
    def headers(self) -> dict[str, str]:
        """The headers that let a warm-up request through."""
        return {WARMUP_HEADER: self.token}

    # --- ASGI -------------------------------------------------------------------------
    def is_warmup(self, scope: Scope) -> bool:
        """The request carries this process's warm-up token and comes from this machine."""
        expected = self.token.encode()
        for name, value in scope.get("headers", []):
            if name == WARMUP_HEADER.encode():
                return hmac.compare_digest(value, expected) and is_local(scope)
        return False

    def _state(self, scope: Scope, phase: Phase) -> dict[str, Any]:
        state: dict[str, Any] = {"status": phase.value}
        if not self.authorized(Request(scope)):
            return state
        if phase is Phase.WARMING and self.state.warmup.where:
            state["progress"] = self.state.warmup.where
        if phase is Phase.READY:
            state.update(self.state.summary)
        return state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return
        phase, app = self.state.phase, self.state.app
        if scope["type"] == "http" and scope["path"] == "/live":
            return await _json(send, 200, {"status": phase.value})
        if scope["type"] == "http" and scope["path"] == "/ready":
            if phase is Phase.READY:
                return await _json(send, 200, self._state(scope, phase))
            return await self._unavailable(scope, send, phase)
        if scope["type"] == "http" and scope["path"].startswith(CONTROL_PREFIX) and self.control:
            return await self.control(scope, receive, send)
        if scope["type"] == "http" and scope["path"].startswith("/metrics"):
            # Read-only; lets a scraper watch the warm-up (llmwarm_phase and friends).
            return await (app or self.metrics_app)(_utf8_headers(scope), receive, send)
        warmup = self.is_warmup(scope)
        passes = phase in (Phase.READY, Phase.STOPPING) or (phase is Phase.WARMING and warmup)
        if passes and app is not None:
            if self.coverage and not warmup and scope["type"] == "http":
                endpoint = BY_PATH.get(scope["path"])
                if endpoint is not None and scope["method"] == "POST":
                    return await self._observed(app, endpoint, scope, receive, send)
            return await app(scope, receive, send)
        await self._unavailable(scope, send, phase)

    async def _observed(
        self, app: ASGIApp, endpoint: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Pass a user's request to vLLM's app and record it in the coverage as its answer
        ends. Its body is read as vLLM reads it, all but its long strings (`Skeleton`: a 5 MB
        image costs no more than a short prompt), the answer's last chunks (its usage),
        its first token's time (TTFT of a stream, by the endpoint's own rule) and its last
        byte's."""
        coverage = self.state.coverage
        coverage.in_flight += 1
        in_flight, start = coverage.in_flight, time.perf_counter()
        body = Skeleton()
        last: deque[bytes] = deque(maxlen=2)  # the answer's last chunks: its usage is there
        watch = FirstToken(SPECS[endpoint])
        status, first, done = 0, 0.0, False

        async def observed_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                body.feed(message.get("body", b""))
            return message

        def record(end: float) -> None:
            if not 200 <= status < 300:
                return
            try:
                tail = b"".join(last)[-TAIL_BYTES:]
                shape = coverage.classify(endpoint, body.parse(), tail, in_flight)
                if shape is not None:
                    latency = (first or end) - start if shape.kind.stream else end - start
                    coverage.record(shape, latency)
            except Exception as exc:  # never a user's request's problem, nor a traceback each
                coverage.untracked["unreadable"] += 1
                logger.debug("a request left out of the coverage: %r", exc)

        async def observed_send(message: Message) -> None:
            nonlocal status, first, done
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                if chunk := message.get("body"):
                    if not first and watch.feed(chunk):
                        first = time.perf_counter()
                    last.append(chunk)
                if not message.get("more_body") and not done:
                    # The answer's last message: recorded before it goes out, so a client
                    # that asks /warmup/coverage right after its answer finds it there; and
                    # no longer in flight (its client may send the next before the app
                    # returns).
                    done = True
                    coverage.in_flight -= 1
                    record(time.perf_counter())
            await send(message)

        try:
            await app(scope, observed_receive, observed_send)
        finally:
            if not done:  # no complete answer (an error, a cancel)
                coverage.in_flight -= 1

    async def _unavailable(self, scope: Scope, send: Send, phase: Phase) -> None:
        if scope["type"] == "websocket":
            # 1013: try again later.
            await send({"type": "websocket.close", "code": 1013})
            return
        body = {
            **self._state(scope, phase),
            "message": "llmwarm: the model server is not warm yet; retry later",
        }
        retry = RETRY_AFTER.get(phase, 5)
        await _json(send, 503, body, [(b"retry-after", str(retry).encode())])


async def _json(
    send: Send,
    status: int,
    body: dict[str, Any],
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"cache-control", b"no-store"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
