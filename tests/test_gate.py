from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from llmwarm.model.profile import Profile
from llmwarm.model.report import Report
from llmwarm.serve.access import Admin
from llmwarm.serve.control import Control
from llmwarm.serve.gate import HEALTH, WARMUP_HEADER, Gate
from llmwarm.serve.metrics import WarmupCollector
from llmwarm.serve.recording import SLICE
from llmwarm.serve.rewarm import Rewarms
from llmwarm.serve.state import Phase, RunState
from tests.fakes import INNER, LoopTurns, report

if TYPE_CHECKING:
    from starlette.types import Message, Receive, Scope, Send


def gate_on(state: RunState | None = None) -> Gate:
    return Gate(state or RunState(window=2))


def client(gate: Gate, peer: str = "127.0.0.1", server: str = "llmwarm") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=gate, client=(peer, 40000))
    return httpx.AsyncClient(transport=transport, base_url=f"http://{server}")


@pytest.mark.parametrize("path", ["/health", "/ready", "/v1/completions", "/v1/models", "/x"])
async def test_loading_answers_503_with_retry_after(path: str) -> None:
    async with client(gate_on()) as c:
        r = await c.get(path)
    assert r.status_code == 503
    assert r.headers["retry-after"] == "10"
    assert r.json()["status"] == "loading"


async def test_warming_lets_only_the_warmup_token_through() -> None:
    gate = gate_on()
    gate.state.warming(INNER)
    gate.state.warmup.where = {"bucket": 1, "buckets": 2, "round": 3}
    async with client(gate) as c:
        outside = await c.post("/v1/completions", json={})
        forged = await c.post("/v1/completions", headers={WARMUP_HEADER: "guess"})
        empty = await c.post("/v1/completions", headers={WARMUP_HEADER: ""})
        warm = await c.post("/v1/completions", headers=gate.headers)
        ready = await c.get("/ready", headers=gate.headers)
    assert outside.status_code == forged.status_code == empty.status_code == 503
    assert outside.headers["retry-after"] == "5"
    body = outside.json()
    assert body.pop("startup")["detail"] == "warming bucket 1 of 2, round 3"  # (test_startup)
    assert body == {
        "status": "warming",
        "progress": {"bucket": 1, "buckets": 2, "round": 3},
        "message": "llmwarm: the model server is not warm yet; retry later",
    }
    assert warm.status_code == 200 and warm.json() == {"served": "/v1/completions"}
    assert ready.status_code == 503  # the token never makes /ready say yes


async def test_the_token_is_refused_from_another_host() -> None:
    gate = gate_on()
    gate.state.warming(INNER)
    async with client(gate, peer="203.0.113.9") as c:
        r = await c.post("/v1/completions", headers=gate.headers)
    assert r.status_code == 503


async def test_the_token_passes_from_the_servers_own_address() -> None:
    # bound to one interface (--host 10.1.2.3), the warm-up dials and comes from that address
    gate = gate_on()
    gate.state.warming(INNER)
    async with client(gate, peer="10.1.2.3", server="10.1.2.3") as c:
        own = await c.post("/v1/completions", headers=gate.headers)
    async with client(gate, peer="10.1.2.4", server="10.1.2.3") as c:
        neighbour = await c.post("/v1/completions", headers=gate.headers)
    assert own.status_code == 200 and neighbour.status_code == 503


def test_each_gate_has_its_own_long_token() -> None:
    a, b = gate_on(), gate_on()
    assert a.token != b.token and len(a.token) >= 40


async def test_ready_passes_everything_and_reports() -> None:
    gate = gate_on()
    gate.state.warming(INNER)
    gate.state.report = report()
    gate.state.serving()
    async with client(gate, peer="203.0.113.9") as c:
        ready = await c.get("/ready")
        health = await c.get("/health")
        v1 = await c.post("/v1/chat/completions", json={})
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", **report().summary()}
    assert health.json() == {"served": "/health"}
    assert v1.json() == {"served": "/v1/chat/completions"}


async def test_stopping_fails_ready_but_serves_in_flight_paths() -> None:
    gate = gate_on()
    gate.state.warming(INNER)
    gate.state.serving()
    gate.state.stopping()
    assert gate.state.phase is Phase.STOPPING
    async with client(gate) as c:
        ready = await c.get("/ready")
        v1 = await c.get("/v1/models")
    assert ready.status_code == 503 and ready.json()["status"] == "stopping"
    assert v1.status_code == 200


async def test_live_is_200_in_every_phase() -> None:
    gate = gate_on()
    seen = []
    async with client(gate, peer="203.0.113.9") as c:
        for change in ("loading", "warming", "ready", "stopping"):
            if change == "warming":
                gate.state.warming(INNER)
            elif change == "ready":
                gate.state.serving()
            elif change == "stopping":
                gate.state.stopping()
            r = await c.get("/live")
            seen.append((r.status_code, r.json()["status"]))
    assert seen == [(200, "loading"), (200, "warming"), (200, "ready"), (200, "stopping")]


# --- fuzzed: whatever a client sends, in every phase ---------------------------------------------

KEY = "sk-fuzz"
PHASES = ["loading", "warming", "ready", "ready-gate-closed", "stopping"]
KNOWN_PATHS = ["/", "/ready", "/live", "/health", "/metrics", "/warmup/", "/warmup/run",
               "/warmup/report", "/warmup/coverage", "/v1/completions", "/v1/chat/completions",
               "/v1/messages", "/v1/models", "/pooling", "/ready/", "//ready",
               "/warmup/run/x", "/v1/metrics", "/metricsz", "/x/metrics"]  # fmt: skip


def _fuzz_state(phase: str) -> tuple[RunState, list[str]]:
    """A run state in `phase` with an inner app that routes as vLLM's does (every path that
    starts with /metrics to its Prometheus app, the rest to its routes) and records each
    request that reached anything but its metrics."""
    reached: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        if not re.match(r"^/metrics", scope["path"]):  # vLLM's Mount("/metrics") path_regex
            reached.append(scope["path"])
        await INNER(scope, receive, send)

    state = RunState(window=2)
    if phase != "loading":
        state.warming(inner)
    if phase.startswith("ready") or phase == "stopping":
        state.report = report()
        state.serving()
        state.gate_closed = phase == "ready-gate-closed"
    if phase == "stopping":
        state.stopping()
    return state, reached


async def _rewarm(profile: Profile, source: str) -> Report:
    return report()


async def _published(report: Report) -> None:
    pass


async def _jit(phase: str) -> None:
    pass


header_names = st.sampled_from(
    [b"authorization", b"content-type", b"content-length", WARMUP_HEADER.encode(), b"host",
     b"x-" + b"a" * 300, b"\xff\xfe", b""]
)  # fmt: skip
header_values = st.one_of(
    st.binary(max_size=64),
    st.just(b"Bearer " + KEY.encode()),
    st.sampled_from([b"guess", b"", b"x" * 65536, b"\x00\xff\xc3\x28"]),
)
bodies = st.one_of(
    st.binary(max_size=256),
    st.just(b"[" * 5000 + b"]" * 5000),  # deeply nested JSON
    st.just(b'{"wait": true, "close_gate": "yes", "profile": "../../etc/passwd"}'),
    st.just(b'{"wait": false}'),
    st.just(b"\xc3\x28" * 100),  # invalid UTF-8
    st.just(b"x" * 2_000_000),  # 2 MB
    st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(st.text(max_size=8),
              st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8)))),
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    phase=st.sampled_from(PHASES),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "BREW"]),
    path=st.one_of(st.sampled_from(KNOWN_PATHS), st.text(max_size=40).map(lambda t: "/" + t)),
    headers=st.lists(st.tuples(header_names, header_values), max_size=6),
    body=bodies,
    peer=st.sampled_from(["127.0.0.1", "203.0.113.9", "::1"]),
    keyed=st.booleans(),
    token=st.sampled_from(["none", "right", "forged"]),
)
def test_the_gate_and_its_endpoints_never_fail_hang_or_let_a_request_in_early(
    phase: str, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes,
    peer: str, keyed: bool, token: str,
) -> None:  # fmt: skip
    state, reached = _fuzz_state(phase)
    authorized = (lambda r: r.headers.get("authorization") == f"Bearer {KEY}") if keyed else (
        lambda r: True
    )  # fmt: skip
    rewarms = Rewarms(
        state, _rewarm, _published, _jit, served=(Profile.model_validate({"auto": {}}), "p"),
        min_interval=0,
    )  # fmt: skip
    gate = Gate(state, Control(state, authorized, rewarms, Admin(None)), authorized)
    if token != "none":  # the warm-up's own header, or one forged by a guess
        value = gate.token if token == "right" else gate.token[:-1] + "x"
        headers = [*headers, (WARMUP_HEADER.encode(), value.encode())]
    sent: list[Message] = []
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)] or [b""]
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # as a client that sent all and waits: never a disconnect
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(
             errors="surrogateescape"), "query_string": b"", "root_path": "",
             "headers": headers, "client": (peer, 40000),
             "server": ("127.0.0.1", 8000)}  # fmt: skip

    async def call() -> None:
        await asyncio.wait_for(gate(scope, receive, send), 10)  # never a hang
        await rewarms.close()

    asyncio.run(call())
    start = next(m for m in sent if m["type"] == "http.response.start")
    # never a 500 of llmwarm's own (the inner app only ever answers 200)
    assert start["status"] < 500 or start["status"] == 503, start
    if phase in ("loading", "warming", "ready-gate-closed"):
        # only the warm-up (its real token, from this machine) may pass before ready; and
        # liveness (`/health`, `/ping`) once the process serves, a re-warm closing the gate
        local = peer != "203.0.113.9"
        liveness = phase == "ready-gate-closed" and path in HEALTH
        assert reached == [] or (token == "right" and local) or liveness, (phase, path, token)
    if start["status"] == 503:
        assert reached == [] and any(n == b"retry-after" for n, _ in start["headers"])


async def test_metrics_with_a_header_that_is_not_utf8_is_no_500() -> None:
    # found by the fuzz test: prometheus_client's app decodes headers as UTF-8; HTTP allows
    # other bytes in a value
    async with client(gate_on()) as c:
        r = await c.get("/metrics", headers={b"accept": b"text/plain; q=\xff"})
    assert r.status_code == 200 and "# TYPE" in r.text


async def test_a_responses_streams_ttft_is_its_first_token_not_its_first_event() -> None:
    # The defect: coverage took the first non-empty chunk as the first token; a Responses
    # stream sends `response.created` (and more) before any token, so a cold miss read as free.
    from starlette.responses import StreamingResponse

    async def events() -> AsyncIterator[bytes]:
        for kind in ("response.created", "response.in_progress"):
            yield f"event: {kind}\ndata: {json.dumps({'type': kind})}\n\n".encode()
        await asyncio.sleep(0.2)  # the first token, a cold prefill later
        delta = {"type": "response.output_text.delta", "delta": "x"}
        yield f"data: {json.dumps(delta)}\n\n".encode()
        done = {"type": "response.completed", "response": {"usage": {"input_tokens": 3}}}
        yield f"data: {json.dumps(done)}\n\n".encode()

    async def responses(request: Request) -> Response:
        await request.body()
        return StreamingResponse(events(), media_type="text/event-stream")

    state = RunState(window=2)
    state.warming(Starlette(routes=[Route("/v1/responses", responses, methods=["POST"])]))
    state.serving()
    body = {"model": "m", "input": "hi", "stream": True, "max_output_tokens": 4, "store": False}
    async with client(gate_on(state)) as c:
        assert (await c.post("/v1/responses", json=body)).status_code == 200
    [miss] = state.coverage.misses.values()
    assert miss.first_s is not None and miss.first_s >= 0.2


USER_KEY = {"authorization": "Bearer sesame"}
MODEL_ROUTES = [
    "/invocations", "/pooling", "/classify", "/score", "/rerank", "/tokenize", "/detokenize",
    "/scale_elastic_ep", "/v1/completions", "/v2/x", "/anything",
]  # fmt: skip
PROBES = ("/health", "/ping", "/version", "/live", "/ready", "/metrics")


@pytest.mark.parametrize("path", MODEL_ROUTES)
async def test_with_an_api_key_every_route_that_runs_the_model_needs_it(path: str) -> None:
    # The defect: vLLM's middleware guards only /v1, /v2, /inference and /cohere; once ready
    # the gate passed /invocations (chat, completions, embeddings), /pooling, /score ... keyless.
    state = RunState(window=2)
    state.warming(INNER)
    state.serving()
    gate = Gate(state, authorized=lambda request: request.headers.get("authorization") == USER_KEY[
        "authorization"])  # fmt: skip
    async with client(gate) as c:
        keyless = await c.post(path, json={"model": "m", "prompt": "x"})
        keyed = await c.post(path, json={"model": "m", "prompt": "x"}, headers=USER_KEY)
        open_ = {p: (await c.get(p)).status_code for p in PROBES}
        preflight = await c.options(path)
    assert keyless.status_code == 401 and keyless.json() == {"error": "Unauthorized"}
    assert keyed.status_code == 200 and keyed.json() == {"served": path}
    assert set(open_.values()) == {200}, open_  # probes, as in vLLM
    assert preflight.status_code != 401  # CORS preflight, as in vLLM


async def test_invocations_are_counted_as_the_endpoint_they_run() -> None:
    async def invocations(request: Request) -> Response:
        await request.body()  # as vLLM reads it
        return Response(b'{"usage": {"prompt_tokens": 3}}', media_type="application/json")

    state = RunState(window=2)
    state.warming(Starlette(routes=[Route("/invocations", invocations, methods=["POST"])]))
    state.serving()
    gate = gate_on(state)
    gate.recording.served = frozenset({"chat", "completions", "embeddings"})
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with client(gate) as c:
        assert (await c.post("/invocations", json=chat)).status_code == 200
        assert (await c.post("/invocations", json={"model": "m", "input": "x"})).status_code == 200
    kinds = {shape.kind.endpoint for shape in state.coverage.served_shapes}
    assert kinds == {"chat", "embeddings"}


async def test_a_body_of_tiny_strings_is_counted_unread_and_shown_on_metrics() -> None:
    # A body read no further (llmwarm.traffic.skeleton) is no shape and no traceback: counted
    # under its reason, where an operator sees it
    async def completions(request: Request) -> Response:
        await request.body()
        return Response(b'{"usage": {"prompt_tokens": 3}}', media_type="application/json")

    state = RunState(window=2)
    state.warming(Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])]))
    state.serving()
    gate = gate_on(state)
    async with client(gate) as c:
        tiny = {"model": "m", "prompt": ["a"] * 100_000, "max_tokens": 4}
        assert (await c.post("/v1/completions", json=tiny)).status_code == 200
    assert state.coverage.untracked["body_dense"] == 1 and not state.coverage.served_shapes
    registry = CollectorRegistry()
    registry.register(WarmupCollector(state))
    untracked = registry.get_sample_value(
        "llmwarm_requests_untracked_total", {"reason": "body_dense"}
    )
    assert untracked == 1


async def test_a_large_body_is_read_a_slice_at_a_time_the_loops_other_work_between() -> None:
    # The defect: a 256 KiB chunk (what asyncio reads from a socket at once) of a hostile body
    # read in one go held the serving loop ~2 ms, every stream it serves waiting; now a slice
    # of it at a time, the loop's other tasks run between two
    turns = LoopTurns()
    during: list[int] = []

    async def completions(request: Request) -> Response:
        before = turns.count
        await request.body()  # as vLLM reads it
        during.append(turns.count - before)
        return Response(b'{"usage": {"prompt_tokens": 3}}', media_type="application/json")

    state = RunState(window=2)
    state.warming(Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])]))
    state.serving()
    body = json.dumps({"model": "m", "prompt": '"' * 131_072, "max_tokens": 4}).encode()
    async with turns, client(gate_on(state)) as c:
        answer = await c.post("/v1/completions", content=body)  # one chunk
    assert answer.status_code == 200
    assert during[0] >= len(body) // SLICE - 1
    (shape,) = state.coverage.served_shapes  # and read whole: classified
    assert shape.kind.endpoint == "completions"


async def test_health_answers_during_a_re_warm_that_closed_the_gate() -> None:
    # A chart that probes /health for liveness (vLLM's production-stack chart) must not
    # restart a replica in the middle of a re-warm: /health follows the process, /ready the
    # gate. Before the first warm-up ends, /health waits with the rest (503).
    state = RunState(window=2)
    state.warming(INNER)
    async with client(gate_on(state)) as c:
        assert (await c.get("/health")).status_code == 503  # warming at start
        state.serving()
        state.gate_closed = True  # a re-warm with close_gate
        health, ping = await c.get("/health"), await c.get("/ping")
        ready, user = await c.get("/ready"), await c.post("/v1/completions", json={})
    assert health.status_code == ping.status_code == 200
    assert ready.status_code == user.status_code == 503
