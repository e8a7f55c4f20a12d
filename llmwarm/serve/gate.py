"""The readiness gate: 503 + Retry-After until the engine is warm, then vLLM's own app.

An ASGI app that wraps vLLM's. It owns `/ready` (200 only when warm: for readiness probes)
and `/live` (200 in every phase while the process runs: for liveness probes, so a replica is
never restarted for warming), and `/startup` (the stage and the predicted time to ready, in
every phase, no key: `llmwarm.serve.startup`). While loading it answers every request itself;
while warming it lets through only llmwarm's own warm-up requests, recognised by a per-process
random token in a header *and* a local peer (loopback, unix socket, or the server's own
address), so no outside client can
forge its way past; once ready it hands every request to vLLM's app, through the coverage's
recorder (`llmwarm.serve.recording`). `/health` (liveness) reaches vLLM whenever the process serves,
a gate-closing re-warm included. `/metrics` is never gated: it is read-only, and it shows the
warm-up's progress. `/warmup/*` goes to llmwarm's own endpoints (`llmwarm.serve.control`) in every
phase.

The warm-up's own requests (hundreds) come through a private listener of their own, with no
access log (`llmwarm.backend.frontend`); the report counts them. User requests are logged as vLLM
logs them.

With an API key (vLLM's `--api-key`), every route of vLLM's but its probes and docs needs it
(stricter than vLLM, whose middleware guards only `/v1` and three more prefixes: `_keyed`), and
the probe answers (`/ready`, 503 bodies) say only the phase to a caller without the key; the
warm-up's progress and summary need the key.
"""

from __future__ import annotations

import hmac
import json
import math
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import make_asgi_app
from starlette.requests import Request

from llmwarm.serve import startup
from llmwarm.serve.access import is_local
from llmwarm.serve.control import PREFIX as CONTROL_PREFIX
from llmwarm.serve.lora import AdapterRoutes
from llmwarm.serve.recording import Recording
from llmwarm.serve.state import Phase, RunState, Stage

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

WARMUP_HEADER = "x-llmwarm-warmup"
STARTUP = "/startup"

# vLLM's routes that answer without the API key: probes and docs, which run no model.
OPEN = frozenset(
    {"/health", "/ping", "/version", "/load", "/docs", "/docs/oauth2-redirect", "/redoc",
     "/openapi.json"}
)  # fmt: skip
# Liveness: vLLM's answer (200 while its engine lives) whenever the process serves.
HEALTH = frozenset({"/health", "/ping"})

# Seconds a client should wait before trying again, by phase (loading takes a minute or
# more, warming tens of seconds), or less when the start expects to be ready sooner.
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
        # user requests go on through it to vLLM's app (off: benchmarks of the gate alone)
        self.recording = Recording(state, enabled=coverage)
        # runtime LoRA adapters: held back until warm (its owner set by the lifecycle)
        self.adapters = AdapterRoutes(state, self.recording)
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
        phase = self.state.phase
        path = scope["path"] if scope["type"] == "http" else None
        if path == "/live":
            return await _json(send, 200, {"status": phase.value})
        if path == STARTUP:  # no key: the stage and the time to ready reveal nothing
            return await _json(send, 200, startup.status(self.state, time.perf_counter()))
        if path == "/ready":
            if phase is Phase.READY:
                return await _json(send, 200, self._state(scope, phase))
            return await self._unavailable(scope, send, phase)
        if path is not None and path.startswith(CONTROL_PREFIX) and self.control:
            return await self.control(scope, receive, send)
        if path is not None and path.startswith("/metrics"):
            # Read-only; lets a scraper watch the warm-up (llmwarm_phase and friends).
            app = self.state.app or self.metrics_app
            return await app(_utf8_headers(scope), receive, send)
        warmup = self.is_warmup(scope)
        if not self._passes(scope, phase, warmup):
            return await self._unavailable(scope, send, phase)
        if not self._keyed(scope):
            return await _json(send, 401, {"error": "Unauthorized"})
        if warmup:
            assert self.state.app is not None
            return await self.state.app(scope, receive, send)
        await self.adapters(scope, receive, send)

    def _passes(self, scope: Scope, phase: Phase, warmup: bool) -> bool:
        """Whether vLLM's app may answer: once ready (and while stopping, to drain), the
        warm-up while warming, and liveness (`HEALTH`) whenever the process serves, a re-warm
        that closed the gate included: a chart that probes `/health` for liveness must not
        restart a replica in the middle of a re-warm."""
        if self.state.app is None:
            return False
        if phase in (Phase.READY, Phase.STOPPING) or (phase is Phase.WARMING and warmup):
            return True
        return self.state.stage is Stage.SERVING and scope.get("path") in HEALTH

    def _keyed(self, scope: Scope) -> bool:
        """With an API key, every route of vLLM's app but its probes and docs (`OPEN`) needs
        it: vLLM's own middleware guards only `/v1`, `/v2`, `/inference` and `/cohere`, and
        `/invocations`, `/pooling`, `/classify`, `/score`, `/rerank`, `/tokenize` ... run the
        model too. A CORS preflight (OPTIONS) passes, as in vLLM."""
        if scope.get("path") in OPEN or scope.get("method") == "OPTIONS":
            return True
        return self.authorized(Request(scope))

    async def _unavailable(self, scope: Scope, send: Send, phase: Phase) -> None:
        if scope["type"] == "websocket":
            # 1013: try again later.
            await send({"type": "websocket.close", "code": 1013})
            return
        status = startup.status(self.state, time.perf_counter())
        body = {
            **self._state(scope, phase),
            "startup": status,
            "message": "llmwarm: the model server is not warm yet; retry later",
        }
        retry = RETRY_AFTER.get(phase, 5)
        if (expected := status.get("expected_ready_in_s")) is not None:
            retry = max(1, min(retry, math.ceil(expected)))
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
