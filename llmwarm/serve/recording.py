"""Live traffic recorded in the coverage: the ASGI middleware between the gate and vLLM's app.

Each user request the gate passes to a model endpoint (a POST to one of `endpoints.SPECS`, or
to `/invocations`, which runs the one its body is for) goes through `Recording`: its body is
read as vLLM reads it, all but its long strings (`llmwarm.traffic.skeleton`: a 5 MB image costs no
more than a short prompt), its answer's last chunks kept (its usage is there), its first token's
time taken by the endpoint's own rule (a stream's TTFT) and its last byte's; as the answer ends,
the request is classified and counted (`llmwarm.traffic.coverage`). Nothing here may fail a user's
request: a body that cannot be read is counted as such, never logged as a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from llmwarm.model.endpoints import BY_PATH, SPECS, FirstToken
from llmwarm.traffic.coverage import TAIL_BYTES
from llmwarm.traffic.skeleton import Skeleton

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from llmwarm.serve.state import RunState

logger = logging.getLogger(__name__)

INVOCATIONS = "/invocations"
# Bytes of a body read at a time: a chunk the server hands over is up to 256 KiB (what asyncio
# reads from a socket at once), and reading that much of a hostile body (escapes, thousands of
# tiny strings) costs ~2 ms in one go; a slice costs ~0.2 ms at most, and the loop serves its
# streams between two (benchmarks/loop_lag.py).
SLICE = 32 * 1024
# What vLLM's `/invocations` runs, in the order it tries its request types
# (vllm/entrypoints/serve/sagemaker/api_router.py): the first the model serves whose fields the
# body has (`classify` and `pooling` take an embedding's `input`).
_INVOKED = ("chat", "completions", "embeddings", "classify", "rerank", "score", "pooling")


async def read(skeleton: Skeleton, chunk: bytes) -> None:
    """Feed a body's chunk to its skeleton a `SLICE` at a time, the loop's other work (every
    stream it serves) between two."""
    for at in range(0, len(chunk), SLICE):
        if skeleton.overflow:  # read no further
            return
        if at:
            await asyncio.sleep(0)
        skeleton.feed(chunk[at : at + SLICE])


def invoked(body: Any, served: frozenset[str]) -> str | None:
    """The endpoint a body sent to `/invocations` runs on a model serving `served`."""
    if not isinstance(body, dict):
        return None
    for name in _INVOKED:
        takes = SPECS[name].in_body(body) or (name in ("classify", "pooling") and "input" in body)
        if name in served and takes:
            return name
    return None


class Recording:
    """Pass user requests to vLLM's app (the run state's), recording those of a model
    endpoint in the coverage (`enabled`: off for the benchmarks that measure it)."""

    def __init__(self, state: RunState, enabled: bool = True) -> None:
        self.state = state
        self.enabled = enabled
        self.served: frozenset[str] = frozenset()  # the endpoints the model serves

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.state.app
        assert app is not None  # the gate passes requests only once it is built
        path = scope["path"]
        if (
            self.enabled
            and scope["type"] == "http"
            and scope["method"] == "POST"
            and (path in BY_PATH or path == INVOCATIONS)
        ):
            return await _Observed(self, BY_PATH.get(path))(app, scope, receive, send)
        return await app(scope, receive, send)


class _Observed:
    """One user request on its way through vLLM's app, recorded as its answer ends."""

    def __init__(self, recording: Recording, endpoint: str | None) -> None:
        self.coverage = recording.state.coverage
        self.served = recording.served
        self.endpoint = endpoint  # None: /invocations, known once its body is read
        self.body = Skeleton()
        self.last: deque[bytes] = deque(maxlen=2)  # the answer's last chunks: its usage
        self.watch: FirstToken | None = None
        self.status = 0
        self.first = 0.0
        self.done = False
        self.coverage.in_flight += 1
        self.in_flight = self.coverage.in_flight
        self.start = time.perf_counter()

    async def __call__(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        async def observed_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                await read(self.body, message.get("body", b""))
            return message

        async def observed_send(message: Message) -> None:
            self.sent(message)
            await send(message)

        try:
            await app(scope, observed_receive, observed_send)
        finally:
            if not self.done:  # no complete answer (an error, a cancel)
                self.coverage.in_flight -= 1

    def sent(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self.endpoint is None:
                self.endpoint = invoked(self.body.parse(), self.served)
            if self.endpoint is not None:
                self.watch = FirstToken(SPECS[self.endpoint])
        elif message["type"] == "http.response.body":
            if chunk := message.get("body"):
                if not self.first and self.watch is not None and self.watch.feed(chunk):
                    self.first = time.perf_counter()
                self.last.append(chunk)
            if not message.get("more_body") and not self.done:
                # The answer's last message: recorded before it goes out, so a client that
                # asks /warmup/coverage right after its answer finds it there; and no longer in
                # flight (its client may send the next before the app returns).
                self.done = True
                self.coverage.in_flight -= 1
                self.record(time.perf_counter())

    def record(self, end: float) -> None:
        if not 200 <= self.status < 300:
            return
        coverage = self.coverage
        if self.body.unread is not None:  # read no further (llmwarm.traffic.skeleton)
            coverage.untracked[f"body_{self.body.unread}"] += 1
            return
        try:
            if self.endpoint is None:
                raise ValueError("a body /invocations runs on no endpoint this model serves")
            tail = b"".join(self.last)[-TAIL_BYTES:]
            shape = coverage.classify(self.endpoint, self.body.parse(), tail, self.in_flight)
            if shape is not None:
                stream = shape.kind.stream
                latency = (self.first or end) - self.start if stream else end - self.start
                coverage.record(shape, latency)
        except Exception as exc:  # never a user's request's problem, nor a traceback each
            coverage.untracked["unreadable"] += 1
            logger.debug("a request left out of the coverage: %r", exc)
