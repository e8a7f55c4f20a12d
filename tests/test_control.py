"""The /warmup/* endpoints and the API-key rules of the gate, on a fake engine app."""

from __future__ import annotations

import asyncio

import httpx
from starlette.requests import Request

from llmwarm.control import Control, Rewarm, RewarmRequest
from llmwarm.errors import ProfileError, WarmupError
from llmwarm.gate import Gate
from llmwarm.report import Report, WarmupFailure
from llmwarm.state import RunState
from tests.fakes import INNER
from tests.fakes import report as _report

KEY = {"authorization": "Bearer sesame"}


def _authorized(request: Request) -> bool:
    return request.headers.get("authorization") == KEY["authorization"]


async def _no_rewarm(request: RewarmRequest) -> Report:
    raise AssertionError("no re-warm expected")


class Served:
    """A gate and its control endpoints on one run state, warming."""

    def __init__(self) -> None:
        self.state = RunState(window=2)
        self.rewarm: Rewarm = _no_rewarm
        self.control = Control(self.state, _authorized, lambda r: self.rewarm(r))
        self.gate = Gate(self.state, self.control, _authorized)
        self.state.warming(INNER)
        self.state.warmup.where = {"bucket": 1, "buckets": 2, "round": 1}

    def open(self, summary_of: Report | None = None) -> None:
        self.state.report = summary_of or self.state.report
        self.state.serving()


def _served() -> tuple[Gate, Served]:
    served = Served()
    return served.gate, served


def client(gate: Gate) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=gate, client=("203.0.113.9", 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://llmwarm")


async def test_every_warmup_endpoint_is_401_without_the_key_in_every_phase() -> None:
    gate, control = _served()
    control.state.report = _report()
    for open_it in (False, True):
        if open_it:
            control.open()
        async with client(gate) as c:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sesame"}):
                got = await c.get("/warmup/report", headers=headers)
                run = await c.post("/warmup/run", headers=headers, json={})
                assert got.status_code == run.status_code == 401, control.state.phase
                assert got.json()["error"] == "Unauthorized"


async def test_probe_answers_say_only_the_phase_without_the_key() -> None:
    gate, served = _served()
    async with client(gate) as c:
        warming = await c.get("/ready")
        warming_keyed = await c.get("/ready", headers=KEY)
        served.open(_report())
        ready = await c.get("/ready")
        ready_keyed = await c.get("/ready", headers=KEY)
    assert warming.status_code == warming_keyed.status_code == 503
    assert "progress" not in warming.json() and warming.json()["status"] == "warming"
    assert warming_keyed.json()["progress"] == {"bucket": 1, "buckets": 2, "round": 1}
    assert ready.status_code == ready_keyed.status_code == 200
    assert ready.json() == {"status": "ready"}
    assert ready_keyed.json() == {"status": "ready", **_report().summary()}


async def test_report_is_404_until_a_warmup_ends_then_the_report() -> None:
    gate, control = _served()
    async with client(gate) as c:
        missing = await c.get("/warmup/report", headers=KEY)
        control.state.report = _report()
        found = await c.get("/warmup/report", headers=KEY)
    assert missing.status_code == 404
    assert found.status_code == 200
    assert Report.model_validate_json(found.text) == control.state.report


async def test_run_is_503_until_serving() -> None:
    gate, _ = _served()
    async with client(gate) as c:
        r = await c.post("/warmup/run", headers=KEY, json={})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"


async def test_run_waits_for_the_rewarm_and_returns_its_report() -> None:
    gate, control = _served()
    control.open()
    asked: list[RewarmRequest] = []

    async def rewarm(request: RewarmRequest) -> Report:
        asked.append(request)
        return _report().model_copy(update={"trigger": "api"})

    control.rewarm = rewarm
    async with client(gate) as c:
        r = await c.post("/warmup/run", headers=KEY, json={"close_gate": True, "profile": "chat"})
        empty = await c.post("/warmup/run", headers=KEY)  # no body: all defaults
    assert r.status_code == empty.status_code == 200 and r.json()["trigger"] == "api"
    assert asked == [
        RewarmRequest(close_gate=True, profile="chat"),
        RewarmRequest(),
    ]


async def test_run_without_wait_is_202_and_a_second_run_meanwhile_409() -> None:
    gate, control = _served()
    control.open()
    release = asyncio.Event()

    async def rewarm(request: RewarmRequest) -> Report:
        await release.wait()
        return _report()

    control.rewarm = rewarm
    async with client(gate) as c:
        started = await c.post("/warmup/run", headers=KEY, json={"wait": False})
        again = await c.post("/warmup/run", headers=KEY, json={"wait": False})
        release.set()
        assert control.control.task is not None
        await control.control.task
        after = await c.post("/warmup/run", headers=KEY, json={"wait": False})
    assert started.status_code == 202 and started.json() == {"status": "started"}
    assert again.status_code == 409
    assert after.status_code == 202
    await control.control.close()


async def test_bad_bodies_name_the_field_and_never_echo_it() -> None:
    gate, control = _served()
    control.open()

    async def rewarm(request: RewarmRequest) -> Report:
        raise AssertionError("a bad body must not start a re-warm")

    control.rewarm = rewarm
    secret = "user-secret-9f3a"
    async with client(gate) as c:
        answers = {
            "unknown field": await c.post("/warmup/run", headers=KEY, json={secret: 1}),
            "bad type": await c.post("/warmup/run", headers=KEY, json={"close_gate": secret}),
            "no such profile": await c.post("/warmup/run", headers=KEY, json={"profile": secret}),
            "path as profile": await c.post(
                "/warmup/run", headers=KEY, json={"profile": "../../etc/passwd"}
            ),
            "not json": await c.post("/warmup/run", headers=KEY, content=f"{{{secret}"),
            "not an object": await c.post("/warmup/run", headers=KEY, json=[secret]),
        }
    for what, r in answers.items():
        assert r.status_code == 400, what
        assert secret not in r.text, what
        assert r.json()["problems"], what
    assert answers["bad type"].json()["problems"][0]["where"] == "close_gate"
    assert answers["no such profile"].json()["problems"][0]["where"] == "profile"


async def test_a_failed_rewarm_answers_with_its_error() -> None:
    gate, control = _served()
    control.open()

    async def warmup_fails(request: RewarmRequest) -> Report:
        raise WarmupError("warm-up request failed", problems=[("bucket b", "HTTP 500")])

    async def profile_does_not_fit(request: RewarmRequest) -> Report:
        raise ProfileError("profile does not fit", problems=[("features.use", "needs lora")])

    async with client(gate) as c:
        control.rewarm = warmup_fails
        failed = await c.post("/warmup/run", headers=KEY)
        control.rewarm = profile_does_not_fit
        misfit = await c.post("/warmup/run", headers=KEY)
    assert failed.status_code == 500
    assert failed.json() == {
        "error": "warm-up request failed",
        "problems": [{"where": "bucket b", "message": "HTTP 500"}],
    }
    assert misfit.status_code == 400 and misfit.json()["problems"][0]["where"] == "features.use"


def test_a_failed_report_is_not_converged() -> None:
    report = _report().model_copy(update={"error": WarmupFailure(message="engine died")})
    assert report.converged is False


def test_every_shipped_profile_is_a_rewarm_profile() -> None:
    # The defect: `long-context` and `structured-output` failed `str.isidentifier()`.
    from llmwarm.profile import shipped_names

    assert {"long-context", "structured-output", "default", "minimal"} <= set(shipped_names())
    for name in shipped_names():
        assert RewarmRequest(profile=name).profile == name
