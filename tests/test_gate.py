from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from llmwarm.gate import WARMUP_HEADER, Gate, quiet_access_log
from llmwarm.state import Phase, RunState
from tests.fakes import INNER, report


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
    assert outside.json() == {
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


async def test_warmup_requests_stay_out_of_the_access_log(caplog: pytest.LogCaptureFixture) -> None:
    access = logging.getLogger("uvicorn.access")

    async def logs(request: Request) -> Response:
        # as uvicorn does: the access line comes from the request's own task
        access.info("%s", request.url.path)
        return Response()

    gate = gate_on()
    gate.state.warming(Starlette(routes=[Route("/{p:path}", logs, methods=["POST"])]))
    async with client(gate) as c:
        with caplog.at_level(logging.INFO, logger="uvicorn.access"):
            with quiet_access_log():
                # a task a request, as uvicorn runs them
                await asyncio.create_task(c.post("/v1/completions", headers=gate.headers))
                gate.state.serving()
                await asyncio.create_task(c.post("/v1/chat/completions"))  # a user's
                await asyncio.create_task(c.post("/v1/responses", headers=gate.headers))
            # once the lifecycle is over, the filter is gone
            await asyncio.create_task(c.post("/v1/messages", headers=gate.headers))
    lines = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert lines == ["/v1/chat/completions", "/v1/messages"]
