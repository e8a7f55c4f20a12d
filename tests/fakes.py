"""Shared fakes for the tests that need no vLLM engine: reports, an inner app for the gate, and
a fake engine (`llmwarm.backend.engine.EngineClient`) whose app speaks the OpenAI wire format, so
the whole lifecycle runs in seconds over a real socket.

The end-to-end layer (`test_e2e.py`, `test_container.py`) never uses these.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from argparse import Namespace
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from llmwarm.backend import loading
from llmwarm.backend.frontend import VllmStop
from llmwarm.model import endpoints
from llmwarm.model.convergence import Rule
from llmwarm.model.corpus import Tokenizer, WarmRequest, WordTokenizer
from llmwarm.model.fit import EngineShape
from llmwarm.model.kinds import Kind
from llmwarm.model.report import BucketResult, JitEvents, Report, RoundResult, Sample
from llmwarm.traffic.coverage import Shape
from llmwarm.warmup import measure

if TYPE_CHECKING:
    from typing_extensions import Self

# --- the warm-up's client, in this process ----------------------------------------------------


class LocalClient:
    """`llmwarm.warmup.client.Client` in this process: for the tests of what the warm-up does with
    what it measures (rounds, sweeps, the KV fill); `ClientProcess` is tested on its own."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    async def __aenter__(self) -> Self:
        self.session = measure.session(self.base_url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def measure_all(self, requests: Sequence[WarmRequest]) -> list[Sample]:
        return await measure.measure_all(self.session, requests)

    async def get_json(self, path: str) -> Any:
        async with self.session.get(path, raise_for_status=True) as response:
            return await response.json()


class ScriptedClient:
    """`llmwarm.warmup.client.Client` with no server and no clock: every request of the n-th batch
    (from 0) takes `script(n)` seconds to its first token, a token and in all, so what the
    convergence rule decides is the test's, never the host's load."""

    def __init__(self, script: Callable[[int], float]) -> None:
        self.script = script
        self.batches = 0
        self.sent: list[list[WarmRequest]] = []  # each batch, in the order sent

    async def measure_all(self, requests: Sequence[WarmRequest]) -> list[Sample]:
        value = self.script(self.batches)
        self.batches += 1
        self.sent.append(list(requests))
        return [
            Sample(
                kind=r.kind, ttft_s=value if r.stream else None, tpot_s=value if r.stream else None,
                e2e_s=value, prompt_tokens=prompt_words(r.body), output_tokens=r.body["max_tokens"],
            )
            for r in requests
        ]  # fmt: skip

    async def get_json(self, path: str) -> Any:
        raise AssertionError(f"no server here: GET {path}")


class LoopTurns:
    """Another task on the event loop, counting its turns (`count`) while in the `async with`:
    how often the loop ran other work meanwhile."""

    def __init__(self) -> None:
        self.count = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.count += 1
            await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


class Clock:
    """`llmwarm.warmup.measure`'s clock in a test (`install`): virtual seconds that a fake server
    sets, read back exactly, whatever the host's load.

    The server calls `at(t)` before it sends each event the client times (a stream's first
    event and its events with text): `at` waits until the client has read the clock for every
    such event sent so far (the client took them all), then moves the time to `t` (never
    back). A request's own start and end are reads too: `arrived()` counts the start when its
    request reaches the server, `ending()` its end as the server sends its last event."""

    def __init__(self) -> None:
        self.now = 0.0
        self.reads = 0
        self.expected = 0

    def perf_counter(self) -> float:
        self.reads += 1
        return self.now

    def install(self, monkeypatch: Any) -> None:
        from types import SimpleNamespace

        from llmwarm.warmup import measure

        monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=self.perf_counter))

    def arrived(self) -> None:
        self.expected += 1

    def ending(self) -> None:
        self.expected += 1

    async def at(self, t: float) -> None:
        while self.reads < self.expected:
            await asyncio.sleep(0)
        self.now = max(self.now, t)
        self.expected += 1  # the event the caller sends now


# --- reports ---------------------------------------------------------------------------------


def sample(kind: str, e2e: float, ttft: float | None = None, tpot: float | None = None) -> Sample:
    return Sample(
        kind=Kind.parse(kind), ttft_s=ttft, tpot_s=tpot, e2e_s=e2e, prompt_tokens=4, output_tokens=8
    )


def shape(kind: str, prompt_tokens: int, concurrency: int, max_tokens: int) -> Shape:
    """A live request's shape: its kind's string form (`chat-stream+logprobs`) and classes."""
    return Shape(Kind.parse(kind), prompt_tokens, concurrency, max_tokens)


def bucket(converged_at: int | None = 3) -> BucketResult:
    return BucketResult(
        name="p4-c1-o8",
        prompt_tokens=4,
        concurrency=1,
        max_tokens=8,
        rounds=[
            RoundResult(
                round=1,
                samples=[sample("completions-stream", 0.9, 0.5, 0.05), sample("completions", 0.7)],
            ),
            RoundResult(
                round=2,
                samples=[sample("completions-stream", 0.2, 0.1, 0.02), sample("completions", 0.3)],
            ),
            RoundResult(
                round=3,
                samples=[sample("completions-stream", 0.1, 0.1, 0.01), sample("completions", 0.1)],
            ),
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
        cache_salt="llmwarm-0123456789abcdef",
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
    toolchain = {"device": "CPU (fake)", "torch_version": "0.0.fake"}

    def __init__(
        self, *, hold_start: bool = False, start_error: Exception | None = None, lora: bool = False
    ) -> None:
        self.start_s = 0.01
        # LoRA (`lora`: as with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING): adapters
        # loaded at run time, and every request that ran on one, by whom (user or warm-up)
        self.lora = lora
        self.adapters: set[str] = set()
        self.on_adapter: list[tuple[str, str]] = []  # (adapter, "user" or "warmup")
        # cleared: the warm-up's requests on an adapter wait (`adapter_seen` once one does)
        self.adapter_pass = asyncio.Event()
        self.adapter_pass.set()
        self.adapter_seen = asyncio.Event()
        # cleared: a load answers only once set, its adapter served meanwhile (as vLLM's: it
        # routes to an adapter from the moment it has loaded it, before its answer)
        self.load_answer = asyncio.Event()
        self.load_answer.set()
        self.loaded = asyncio.Event()
        self.hold_start = hold_start
        self.start_error = start_error
        self.started = asyncio.Event()
        self.dead = False
        self.shut_down = False
        self.lifespan_ran = False
        self.hold = asyncio.Event()
        self.hold.set()  # set: requests pass
        self.hold_when: Callable[[], bool] = lambda: True
        self.seen = asyncio.Event()
        self.vllm_stop = VllmStop()  # the one the lifecycle hands to its app
        self.finished = 0  # generate requests answered in full
        self.salts: list[str | None] = []  # each generate request's cache_salt
        self.running = self.peak = 0  # generate requests under way, and their most at once
        # A JIT monitor: the first request of each (path, stream) "compiles" once, counted in
        # the phase llmwarm last set.
        self.jit_phases: list[str] = []
        self.jit = {"warmup": 0, "serving": 0}
        self._compiled: set[tuple[str, bool]] = set()
        self.die_at_phase: str | None = None  # die when told this JIT phase (`jit_phase`)
        self.at_lifespan: Callable[[], None] = lambda: None  # as the app's lifespan starts

    # --- what a test does to it
    def holding(self, when: Callable[[], bool] = lambda: True) -> None:
        """Hold every generate request from now on, or from the first that arrives when
        `when()` is true (a condition on the run state: it holds at that point, whatever the
        host's speed)."""
        self.seen.clear()
        self.hold.clear()
        self.hold_when = when

    def release(self) -> None:
        self.hold.set()

    def die(self) -> None:
        self.dead = True

    @contextlib.asynccontextmanager
    async def start(
        self, args: Namespace, on_stage: Callable[[str], None] = lambda stage: None
    ) -> AsyncIterator[FakeEngine]:
        """`llmwarm.backend.engine.start_engine`'s stand-in: its worker says it loads the
        weights."""
        on_stage(loading.STAGES[0][1])
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
        return EngineShape(
            max_model_len=1024,
            max_num_seqs=16,
            max_num_batched_tokens=512,
            endpoints=frozenset(endpoints.GENERATE),
            lora_enabled=self.lora,
        )

    def tokenizer(self) -> Tokenizer:
        return WordTokenizer()

    def is_dead(self) -> bool:
        return self.dead

    def dead_reason(self) -> str:
        return "the fake EngineCore ended"

    async def build_app(self, stop: VllmStop) -> ASGIApp:
        self.vllm_stop = stop
        return Starlette(
            routes=[
                *(
                    Route(endpoints.SPECS[name].path, self._generate, methods=["POST"])
                    for name in endpoints.GENERATE
                ),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/load_lora_adapter", self._load, methods=["POST"]),
                Route("/v1/unload_lora_adapter", self._unload, methods=["POST"]),
            ]
        )

    @contextlib.asynccontextmanager
    async def app_lifespan(self, app: ASGIApp) -> AsyncIterator[None]:
        self.lifespan_ran = True
        self.at_lifespan()
        yield

    def config_hash(self) -> str:
        return "fakehash"

    async def jit_phase(self, phase: str) -> None:
        self.jit_phases.append(phase)
        if phase == self.die_at_phase:  # as a call to a dead vLLM engine
            self.die()
            raise RuntimeError("EngineCore encountered an issue (the fake's)")

    async def jit_events(self) -> JitEvents | None:
        return JitEvents(active=True, **self.jit)

    def take_running_peak(self) -> int | None:
        peak, self.peak = self.peak, 0
        return peak or None

    # --- the app
    async def _models(self, request: Request) -> Response:
        adapters = [{"id": name, "parent": "fake/model"} for name in sorted(self.adapters)]
        return JSONResponse({"data": [{"id": "fake/model", "parent": None}, *adapters]})

    async def _load(self, request: Request) -> Response:
        """As vLLM's: 200 and a plain-text success; 400 for an adapter loaded already (unless
        in place); 404 for a path with no adapter."""
        body = await request.json()
        name = body["lora_name"]
        if not self.lora:
            return JSONResponse({"error": {"message": "LoRA is not enabled"}}, status_code=400)
        if name in self.adapters and not body.get("load_inplace"):
            message = f"The lora adapter '{name}' has already been loaded."
            return JSONResponse({"error": {"message": message}}, status_code=400)
        if body["lora_path"] == "/nowhere":
            return JSONResponse({"error": {"message": "not found"}}, status_code=404)
        self.adapters.add(name)
        self.loaded.set()
        await self.load_answer.wait()
        return Response(f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload(self, request: Request) -> Response:
        name = (await request.json())["lora_name"]
        if name not in self.adapters:
            return JSONResponse({"error": {"message": "not found"}}, status_code=404)
        self.adapters.discard(name)
        return Response(f"Success: LoRA adapter '{name}' removed successfully.")

    async def _generate(self, request: Request) -> Response:
        body: dict[str, Any] = await request.json()
        if self.dead:  # as vLLM's error handler: 500, and it asks its server to stop
            self.vllm_stop.should_exit = True
            return JSONResponse({"error": {"message": "EngineDeadError"}}, status_code=500)
        model = body.get("model", "fake/model")
        if model != "fake/model":
            if model not in self.adapters:  # as vLLM: no such model
                return JSONResponse({"error": {"message": "no such model"}}, status_code=404)
            warmup = "x-llmwarm-warmup" in request.headers
            self.on_adapter.append((model, "warmup" if warmup else "user"))
            if warmup and not self.adapter_pass.is_set():
                self.adapter_seen.set()
                await self.adapter_pass.wait()
        self.salts.append(body.get("cache_salt"))
        kind = (request.url.path, bool(body.get("stream")))
        if kind not in self._compiled:
            self._compiled.add(kind)
            self.jit[self.jit_phases[-1] if self.jit_phases else "warmup"] += 1
        if not self.hold.is_set() and self.hold_when():
            self.seen.set()
            await self.hold.wait()
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            return await answer(request.url.path, body, gap=0.001, done=self._done)
        finally:
            self.running -= 1

    def _done(self) -> None:
        self.finished += 1


def _sse(event: dict[str, Any]) -> str:
    named = f"event: {event['type']}\n" if "type" in event else ""
    return f"{named}data: {json.dumps(event)}\n\n"


def _stream_events(path: str, tokens: int, usage: dict[str, int]) -> list[dict[str, Any]]:
    """What each API streams: per-token events between its own opening and closing ones."""
    io = {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]}
    if path == "/v1/responses":
        token: dict[str, Any] = {"type": "response.output_text.delta", "delta": "x"}
        return [*[token] * tokens, {"type": "response.completed", "response": {"usage": io}}]
    if path == "/v1/messages":
        start = {"type": "message_start", "message": {"usage": {**io, "output_tokens": 0}}}
        token = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "x"}}
        end = {"type": "message_delta", "usage": {"output_tokens": tokens}}
        return [start, *[token] * tokens, end, {"type": "message_stop"}]
    if path == "/v1/chat/completions":  # a role-only first chunk carries no token
        token = {"choices": [{"index": 0, "delta": {"content": "x"}}]}
        first = {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}
        return [first, *[token] * tokens, {"choices": [], "usage": usage}]
    token = {"choices": [{"index": 0, "text": "x"}]}
    return [*[token] * tokens, {"choices": [], "usage": usage}]


def _unary(path: str, tokens: int, usage: dict[str, int]) -> dict[str, Any]:
    io = {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]}
    text = "x" * tokens
    if path == "/v1/responses":
        return {"output": [{"type": "message", "content": [{"text": text}]}], "usage": io}
    if path == "/v1/messages":
        return {"content": [{"type": "text", "text": text}], "usage": io}
    if path == "/v1/chat/completions":
        return {"choices": [{"index": 0, "message": {"content": text}}], "usage": usage}
    if path == "/v1/completions":
        return {"choices": [{"index": 0, "text": text}], "usage": usage}
    # embeddings, pooling, classify, score, rerank: no output tokens
    return {
        "data": [{"index": 0, "embedding": [0.5]}],
        "usage": {"prompt_tokens": usage["prompt_tokens"]},
    }


async def answer(
    path: str,
    body: dict[str, Any],
    *,
    gap: float,
    prompt_tokens: int = 8,
    done: Callable[[], None] = lambda: None,
) -> Response:
    """A vLLM-like answer to `body` on `path`, in that API's own wire format, a token every
    `gap` seconds."""
    tokens = int(body.get("max_tokens") or body.get("max_output_tokens") or 4)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens}
    if not body.get("stream"):
        await asyncio.sleep(gap * tokens)
        done()
        return JSONResponse(_unary(path, tokens, usage))

    async def events() -> AsyncIterator[str]:
        for event in _stream_events(path, tokens, usage):
            if "choices" in event and event["choices"] or event.get("delta"):
                await asyncio.sleep(gap)
            yield _sse(event)
        if path in ("/v1/completions", "/v1/chat/completions"):
            yield "data: [DONE]\n\n"
        done()

    return StreamingResponse(events(), media_type="text/event-stream")


MINIMAL_PROFILE = Path(__file__).resolve().parent.parent / "llmwarm" / "configs" / "minimal.yaml"


# --- a paced OpenAI server (measurement tests) ---------------------------------------------------


class Pace:
    """Seconds between streamed tokens, as a function of how many requests came before: one a
    test (the `pace` fixture), never shared.

    `hold_until(n)` holds every request until `n` have arrived (a batch really in flight at
    once, whatever the host's load); `release()` lets held ones go."""

    def __init__(self, gap: Callable[[int], float] = lambda calls: 0.01) -> None:
        self.calls = 0
        self.gap = gap
        self.arrived = asyncio.Event()  # set once the held count is reached
        self.arrived.set()
        self._until = 0

    def hold_until(self, requests: int) -> None:
        self._until = requests
        self.arrived.clear()

    def release(self) -> None:
        self.arrived.set()

    def next(self) -> float:
        self.calls += 1
        if self.calls >= self._until:
            self.arrived.set()
        return float(self.gap(self.calls - 1))


def _words(value: Any) -> int:
    """A prompt's length as `WordTokenizer` counts it (one token a word, a token ID each),
    wherever the body carries it: a prompt, a list of them, messages and their parts."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(_words(item) for item in value)
    if isinstance(value, dict):
        return _words(value.get("content") or value.get("text") or "")
    return 0


def prompt_words(body: dict[str, Any]) -> int:
    """The words of a body's prompt, whichever field each API puts it in (a query, for score
    and rerank: their documents are counted apart)."""
    fields = ("prompt", "messages", "input", "query", "queries")
    return _words(next((body[f] for f in fields if f in body), ""))


def paced_app(pace: Pace) -> Starlette:
    """Every endpoint, answered at `pace`, with the prompt's length in words as its usage."""

    async def paced(request: Request) -> Response:
        body = await request.json()
        gap = pace.next()
        await pace.arrived.wait()
        if body.get("model") == "broken":
            return JSONResponse({"error": {"message": "no such model"}}, status_code=404)
        if "grammar" in (body.get("structured_outputs") or {}):
            return JSONResponse(
                {"error": {"message": "grammars are not supported"}}, status_code=400
            )
        return await answer(request.url.path, body, gap=gap, prompt_tokens=prompt_words(body))

    return Starlette(
        routes=[Route(spec.path, paced, methods=["POST"]) for spec in endpoints.SPECS.values()]
    )


def fill(where: Path, leave: int = 4096) -> None:
    """Fill `where`'s file system but for `leave` bytes: too little for a report."""
    free = os.statvfs(where).f_bavail * os.statvfs(where).f_frsize
    (where / "filler").write_bytes(b"x" * max(0, free - leave))
