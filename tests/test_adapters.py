"""LoRA adapters loaded at run time, warm before a user's request runs on them
(`llmwarm.serve.lora`), on a lifecycle serving a fake engine (tests/running.py): a user's request
naming a warming adapter is refused (503), the base model serves meanwhile; unloading, loading
twice, a load that fails, a warm-up that fails and SIGTERM mid-warm-up."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from prometheus_client import REGISTRY

from llmwarm.backend import engine
from llmwarm.serve.lora import AdapterRoutes
from llmwarm.serve.recording import SLICE
from llmwarm.serve.state import Adapter, RunState, Stage
from tests.fakes import FakeEngine, LoopTurns
from tests.running import Run

if TYPE_CHECKING:
    from starlette.types import Message, Receive, Scope, Send

BASE = {"model": "fake/model", "prompt": "hi", "max_tokens": 2}
ON_SQL = {"model": "sql", "prompt": "select", "max_tokens": 2}


@pytest.fixture(autouse=True)
def no_forced_exit(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    forced: list[int] = []
    monkeypatch.setattr(engine, "force_exit", forced.append)
    yield forced


async def serving(running: Callable[..., Run]) -> Run:
    run = running(FakeEngine(lora=True))
    await run.until(Stage.SERVING)
    return run


async def load(run: Run, name: str = "sql", **more: object) -> httpx.Response:
    body = {"lora_name": name, "lora_path": f"/adapters/{name}", **more}
    return await run.client.post("/v1/load_lora_adapter", json=body)


async def warming(run: Run, name: str = "sql") -> None:
    """Load `name` with its warm-up's requests held at the fake engine: it is warming."""
    run.eng.adapter_pass.clear()
    run.eng.adapter_seen.clear()
    assert (await load(run, name)).status_code == 200
    await run.eng.adapter_seen.wait()


async def warm(run: Run, name: str = "sql") -> None:
    """Until `name` is let through."""
    while (adapter := run.life.state.adapters.get(name)) is None or adapter.warming:
        assert not run.task.done(), run.task
        await asyncio.sleep(0.005)


def adapter_warmups(outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "llmwarm_warmups_total", {"trigger": "adapter", "outcome": outcome}
    )
    return value or 0.0


async def test_a_loaded_adapter_is_refused_until_warm_while_the_base_serves(
    running: Callable[..., Run], tmp_path: Path
) -> None:
    run = await serving(running)
    await warming(run)
    refused = await run.client.post("/v1/completions", json=ON_SQL)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert refused.json()["adapter"] == "sql" and refused.json()["status"] == "warming"
    assert (await run.client.post("/v1/completions", json=BASE)).status_code == 200
    assert (await run.client.get("/ready")).status_code == 200  # the replica stays ready
    run.eng.adapter_pass.set()
    await warm(run)
    assert (await run.client.post("/v1/completions", json=ON_SQL)).status_code == 200
    # vLLM ran the adapter's warm-up before any user request on it
    whom = [who for _, who in run.eng.on_adapter]
    assert whom[-1] == "user" and "user" not in whom[:-1] and len(whom) > 1
    # the report lists it, its kinds warm; the file too
    entry = (await run.client.get("/warmup/report")).json()["adapters"][0]
    assert entry["name"] == "sql" and entry["converged"] and entry["error"] is None
    assert entry["warm_after_s"] >= entry["warmup_s"] > 0
    assert {"completions+lora:sql", "chat-stream+lora:sql"} <= {k["kind"] for k in entry["kinds"]}
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["adapters"][0]["name"] == "sql"
    # coverage counts the request on it as covered
    coverage = (await run.client.get("/warmup/coverage")).json()
    assert "completions+lora:sql" in coverage["warmed"]["kinds"]
    assert not [m for m in coverage["uncovered_by_requests"] if "lora:sql" in m["kind"]]


async def test_a_request_while_vllm_loads_the_adapter_waits_as_a_warming_one(
    running: Callable[..., Run],
) -> None:
    # vLLM serves an adapter once loaded, before its answer to the load: a user's request
    # in between would run cold (seen under load in the e2e test: 404, 200, then 503s)
    run = await serving(running)
    run.eng.load_answer.clear()
    run.eng.loaded.clear()
    loading = asyncio.create_task(load(run))
    await run.eng.loaded.wait()  # loaded in vLLM, its answer not sent yet
    refused = await run.client.post("/v1/completions", json=ON_SQL)
    assert refused.status_code == 503 and refused.json()["adapter"] == "sql"
    run.eng.load_answer.set()
    assert (await loading).status_code == 200
    await warm(run)
    assert (await run.client.post("/v1/completions", json=ON_SQL)).status_code == 200
    assert [who for _, who in run.eng.on_adapter][-1] == "user"
    assert "user" not in [who for _, who in run.eng.on_adapter][:-1]


async def test_a_refused_load_leaves_no_adapter_held(running: Callable[..., Run]) -> None:
    run = await serving(running)
    missing = await load(run, "gone", lora_path="/nowhere")
    assert missing.status_code == 404
    assert "gone" not in run.life.state.adapters
    # vLLM's own 404 for a model it does not serve, not a 503 for an adapter never loaded
    asked = await run.client.post("/v1/completions", json={**ON_SQL, "model": "gone"})
    assert asked.status_code == 404


async def test_only_the_adapter_s_warm_up_runs_its_feature_buckets(
    running: Callable[..., Run],
) -> None:
    run = await serving(running)
    before = run.life.state.warmup.requests
    assert (await load(run)).status_code == 200
    await warm(run)
    report = (await run.client.get("/warmup/report")).json()
    # the start-up warm-up's report stays the one shown; the adapter's is an entry of it
    assert report["trigger"] == "startup" and report["requests"] >= before
    entry = report["adapters"][0]
    assert all("lora:sql" in k["kind"] for k in entry["kinds"])
    assert adapter_warmups("converged") + adapter_warmups("unconverged") >= 1


async def test_an_adapter_unloaded_while_warming_ends_its_warm_up_first(
    running: Callable[..., Run],
) -> None:
    run = await serving(running)
    await warming(run)
    gone = await run.client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
    assert gone.status_code == 200
    run.eng.adapter_pass.set()  # (a warm-up request still held would now meet no adapter)
    assert "sql" not in run.life.state.adapters and not run.life.rewarms._adapters
    # vLLM's own answer for an adapter it does not have, not a 503
    assert (await run.client.post("/v1/completions", json=ON_SQL)).status_code == 404
    assert (
        "adapters" not in (await run.client.get("/warmup/report")).json()
        or not ((await run.client.get("/warmup/report")).json()["adapters"])
    )
    # loaded again: warmed again
    assert (await load(run)).status_code == 200
    await warm(run)
    assert (await run.client.post("/v1/completions", json=ON_SQL)).status_code == 200


async def test_loading_an_adapter_twice_keeps_it_warm_and_in_place_warms_it_again(
    running: Callable[..., Run],
) -> None:
    run = await serving(running)
    assert (await load(run)).status_code == 200
    await warm(run)
    first = run.life.state.adapters["sql"]
    again = await load(run)
    assert again.status_code == 400  # vLLM refuses: nothing changes here
    assert run.life.state.adapters["sql"] is first and not first.warming
    assert (await run.client.post("/v1/completions", json=ON_SQL)).status_code == 200
    # new weights in place: warming again, refused meanwhile
    run.eng.adapter_pass.clear()
    run.eng.adapter_seen.clear()
    assert (await load(run, load_inplace=True)).status_code == 200
    await run.eng.adapter_seen.wait()
    assert (await run.client.post("/v1/completions", json=ON_SQL)).status_code == 503
    run.eng.adapter_pass.set()
    await warm(run)
    assert (await run.client.post("/v1/completions", json=ON_SQL)).status_code == 200


async def test_a_load_vllm_refuses_changes_nothing(running: Callable[..., Run]) -> None:
    run = await serving(running)
    failed = await run.client.post(
        "/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/nowhere"}
    )
    assert failed.status_code == 404  # vLLM's answer, passed on
    assert run.life.state.adapters == {} and not run.life.rewarms._adapters
    assert (await run.client.post("/v1/completions", json=ON_SQL)).status_code == 404


async def test_an_adapter_whose_warm_up_fails_is_served_cold_and_counted(
    running: Callable[..., Run], caplog: pytest.LogCaptureFixture
) -> None:
    run = await serving(running)
    failed = adapter_warmups("failed")
    run.eng.adapter_pass.clear()
    run.eng.adapter_seen.clear()
    assert (await load(run)).status_code == 200
    await run.eng.adapter_seen.wait()
    run.eng.adapters.discard("sql")  # vLLM lost it: the held request's next ones get 404
    run.eng.adapter_pass.set()
    await warm(run)
    assert run.life.state.adapters["sql"].failed
    assert adapter_warmups("failed") == failed + 1
    assert "its warm-up failed" in caplog.text and "serving it cold" in caplog.text
    entry = (await run.client.get("/warmup/report")).json()["adapters"][0]
    assert entry["error"] is not None and not entry["converged"]


async def test_sigterm_during_an_adapter_s_warm_up_cancels_it_and_drains(
    running: Callable[..., Run],
) -> None:
    run = await serving(running)
    await warming(run)
    os.kill(os.getpid(), signal.SIGTERM)
    await run.until(Stage.STOPPING)  # (the warm-ups were cancelled in that step)
    run.eng.adapter_pass.set()  # its request held at the engine drains
    report = await run.task  # the serve ends as asked
    assert report.error is None
    assert run.life.state.adapters["sql"].warming  # never let through
    assert all(t.done() for t in run.life.rewarms._adapters.values())


async def test_a_rewarm_waits_for_an_adapter_s_warm_up(running: Callable[..., Run]) -> None:
    run = await serving(running)
    await warming(run)
    sent = run.eng.finished
    rewarm = asyncio.create_task(run.client.post("/warmup/run", json={}))
    lock = run.life.rewarms._engine
    while not lock._waiters:  # the re-warm waits for the engine, the adapter's warm-up has it
        await asyncio.sleep(0.005)
    assert run.eng.finished == sent  # it sent nothing meanwhile
    run.eng.adapter_pass.set()
    answer = await rewarm
    assert answer.status_code == 200, answer.text
    # the re-warm lists the adapter (now served) and warms it too; the entry is kept
    kinds = {k["kind"] for k in answer.json()["kinds"]}
    assert "completions+lora:sql" in kinds
    assert [a["name"] for a in (await run.client.get("/warmup/report")).json()["adapters"]] == [
        "sql"
    ]


async def test_a_large_body_is_read_for_its_adapter_a_slice_at_a_time() -> None:
    # The defect: while an adapter warmed, every model request's body was read for its `model`
    # in one go on the serving loop (a 5 MB image: ~8 ms, a 400 KB hostile prompt: ~4 ms); now
    # a slice at a time, as the recording reads it, the loop's other work between two
    passed: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        passed.append(json.loads((await receive())["body"])["model"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    state = RunState(window=2)
    state.adapters["sql"] = Adapter(loaded=0.0)  # warming
    routes = AdapterRoutes(state, app, owner=object())  # type: ignore[arg-type]
    statuses: list[int] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async with LoopTurns() as turns:
        for model in ("sql", "fake/model"):
            body = json.dumps({"model": model, "prompt": '"' * 131_072}).encode()

            async def receive(body: bytes = body) -> Message:
                return {"type": "http.request", "body": body, "more_body": False}

            scope: Scope = {"type": "http", "method": "POST", "path": "/v1/completions"}
            before = turns.count
            await routes(scope, receive, send)
            assert turns.count - before >= len(body) // SLICE - 1
    assert statuses == [503, 200] and passed == ["fake/model"]
