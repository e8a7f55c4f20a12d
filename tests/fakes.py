"""Shared fakes for the tests that need no vLLM engine: reports, an inner app for the gate, and
a fake engine (`llmwarm.engine.EngineClient`) whose app speaks the OpenAI wire format, so the
whole lifecycle runs in seconds over a real socket.

The end-to-end layer (`test_e2e.py`, `test_container.py`) never uses these.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from argparse import Namespace
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from llmwarm.convergence import Rule
from llmwarm.corpus import Tokenizer, WordTokenizer
from llmwarm.profile import EngineShape
from llmwarm.report import BucketResult, Report, RoundResult, Sample

# --- reports ---------------------------------------------------------------------------------


def sample(kind: str, e2e: float, ttft: float | None = None, tpot: float | None = None) -> Sample:
    return Sample(kind=kind, ttft_s=ttft, tpot_s=tpot, e2e_s=e2e, prompt_tokens=4, output_tokens=8)


def bucket(converged_at: int | None = 3) -> BucketResult:
    return BucketResult(
        name="p4-c1-o8",
        prompt_tokens=4,
        concurrency=1,
        max_tokens=8,
        rounds=[
            RoundResult(round=1, samples=[sample("c-stream", 0.9, 0.5, 0.05), sample("c", 0.7)]),
            RoundResult(round=2, samples=[sample("c-stream", 0.2, 0.1, 0.02), sample("c", 0.3)]),
            RoundResult(round=3, samples=[sample("c-stream", 0.1, 0.1, 0.01), sample("c", 0.1)]),
        ],
        converged_at=converged_at,
        stop_reason="converged" if converged_at else "max_rounds",
    )


def report(*buckets: BucketResult) -> Report:
    return Report(
        llmwarm_version="0.1.0",
        vllm_version="0.32.0",
        model="tiny",
        profile="configs/default.yaml",
        started_at=datetime(2026, 11, 28, tzinfo=timezone.utc),
        engine_start_s=30.0,
        warmup_s=2.5,
        requests=6,
        prefix_cache_reset=True,
        convergence=Rule(window=2),
        on_unconverged="serve",
        budget_exhausted=False,
        buckets=list(buckets) or [bucket()],
    )


# --- an app for the gate to wrap ---------------------------------------------------------------


async def _echo_path(request: Request) -> Response:
    return JSONResponse({"served": request.url.path})


INNER = Starlette(routes=[Route("/{path:path}", _echo_path, methods=["GET", "POST"])])


# --- a fake engine -------------------------------------------------------------------------------


class FakeEngine:
    """An `EngineClient` whose app answers completions and chat (streamed or not) with
    `max_tokens` tokens, a millisecond each.

    `hold` makes every generate request wait until it is cleared (`release()`); `seen` is
    set once a request is held, so a test waits on that condition, never on a fixed sleep.
    """

    vllm_version = "0.0.fake"

    def __init__(self, *, hold_start: bool = False, start_error: Exception | None = None) -> None:
        self.start_s = 0.01
        self.hold_start = hold_start
        self.start_error = start_error
        self.started = asyncio.Event()
        self.dead = False
        self.shut_down = False
        self.lifespan_ran = False
        self.hold = asyncio.Event()
        self.hold.set()  # set: requests pass
        self.seen = asyncio.Event()
        self.finished = 0  # generate requests answered in full

    # --- what a test does to it
    def holding(self) -> None:
        self.seen.clear()
        self.hold.clear()

    def release(self) -> None:
        self.hold.set()

    def die(self) -> None:
        self.dead = True

    @contextlib.asynccontextmanager
    async def start(self, args: Namespace) -> AsyncIterator[FakeEngine]:
        """`llmwarm.engine.start_engine`'s stand-in."""
        self.started.set()
        try:
            if self.hold_start:
                await asyncio.Event().wait()  # until cancelled
            if self.start_error is not None:
                raise self.start_error
            yield self
        finally:
            self.shut_down = True

    # --- EngineClient
    def shape(self) -> EngineShape:
        return EngineShape(max_model_len=1024, max_num_seqs=16, max_num_batched_tokens=512)

    def tokenizer(self) -> Tokenizer:
        return WordTokenizer()

    def is_dead(self) -> bool:
        return self.dead

    def dead_reason(self) -> str:
        return "the fake EngineCore ended"

    async def reset_prefix_cache(self) -> bool:
        return True

    async def build_app(self, server: uvicorn.Server) -> ASGIApp:
        return Starlette(
            routes=[
                Route("/v1/completions", self._generate, methods=["POST"]),
                Route("/v1/chat/completions", self._generate, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )

    @contextlib.asynccontextmanager
    async def app_lifespan(self, app: ASGIApp) -> AsyncIterator[None]:
        self.lifespan_ran = True
        yield

    def config_hash(self) -> str:
        return "fakehash"

    # --- the app
    async def _models(self, request: Request) -> Response:
        return JSONResponse({"data": [{"id": "fake/model", "parent": None}]})

    async def _generate(self, request: Request) -> Response:
        body: dict[str, Any] = await request.json()
        if not self.hold.is_set():
            self.seen.set()
            await self.hold.wait()
        tokens = int(body.get("max_tokens") or 4)
        usage = {"prompt_tokens": 8, "completion_tokens": tokens}
        chat = "messages" in body

        def choice(text: str) -> dict[str, Any]:
            return {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}

        if not body.get("stream"):
            await asyncio.sleep(0.001 * tokens)
            self.finished += 1
            message = {"message": {"content": "x" * tokens}} if chat else {"text": "x" * tokens}
            return JSONResponse({"choices": [{"index": 0, **message}], "usage": usage})

        async def events() -> AsyncIterator[str]:
            for _ in range(tokens):
                await asyncio.sleep(0.001)
                yield f"data: {json.dumps({'choices': [choice('x')]})}\n\n"
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
            self.finished += 1

        return StreamingResponse(events(), media_type="text/event-stream")


MINIMAL_PROFILE = Path(__file__).resolve().parent.parent / "llmwarm" / "configs" / "minimal.yaml"


# --- a paced OpenAI server (measurement tests) ---------------------------------------------------


class Pace:
    """Seconds between streamed tokens, as a function of how many requests came before."""

    def __init__(self) -> None:
        self.calls = 0
        self.gap: Callable[[int], float] = lambda calls: 0.01

    def next(self) -> float:
        self.calls += 1
        return float(self.gap(self.calls - 1))


PACE = Pace()


async def _completions(request: Request) -> Response:
    body = await request.json()
    gap = PACE.next()
    n = body["max_tokens"]
    usage = {"prompt_tokens": 7, "completion_tokens": n}
    if body.get("model") == "broken":
        return JSONResponse({"error": {"message": "no such model"}}, status_code=404)
    if "grammar" in (body.get("structured_outputs") or {}):
        return JSONResponse({"error": {"message": "grammars are not supported"}}, status_code=400)
    if not body.get("stream"):
        await asyncio.sleep(gap * n)
        return JSONResponse({"choices": [{"text": "x" * n}], "usage": usage})

    async def events() -> AsyncIterator[str]:
        chat = "messages" in body
        if chat:  # a role-only first chunk carries no token
            yield f"data: {json.dumps({'choices': [{'delta': {'role': 'assistant'}}]})}\n\n"
        for _ in range(n):
            await asyncio.sleep(gap)
            choice = {"delta": {"content": "x"}} if chat else {"text": "x"}
            yield f"data: {json.dumps({'choices': [choice]})}\n\n"
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


PACED = Starlette(
    routes=[
        Route("/v1/completions", _completions, methods=["POST"]),
        Route("/v1/chat/completions", _completions, methods=["POST"]),
    ]
)
