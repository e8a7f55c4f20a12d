"""The /warmup/* endpoints, who may call them, and the rules of re-warms, on a fake engine app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest
from starlette.requests import Request

from llmwarm.errors import ProfileError, WarmupError
from llmwarm.model.profile import Profile
from llmwarm.model.report import Report, WarmupFailure
from llmwarm.serve.access import Admin
from llmwarm.serve.control import Control
from llmwarm.serve.gate import Gate
from llmwarm.serve.rewarm import RewarmRequest, Rewarms
from llmwarm.serve.state import RunState
from tests.fakes import INNER, MINIMAL_PROFILE
from tests.fakes import report as _report

KEY = {"authorization": "Bearer sesame"}
ADMIN = {"authorization": "Bearer admin-7c1e"}
JSON_ADMIN = {**ADMIN, "content-type": "application/json"}
OUTSIDE = ("203.0.113.9", 40000)  # a client on another host
LOOPBACK = ("127.0.0.1", 40000)


def _authorized(request: Request) -> bool:
    return request.headers.get("authorization") == KEY["authorization"]


async def _no_rewarm(profile: Profile, source: str) -> Report:
    raise AssertionError("no re-warm expected")


class Served:
    """A gate, its control endpoints and the re-warm owner on one run state, warming. `warm`
    stands in for a warm-up of the engine; `published` lists what was published."""

    def __init__(
        self, admin_key: str | None = "admin-7c1e", interval: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.state = RunState(window=2)
        self.warm: Callable[[Profile, str], Awaitable[Report]] = _no_rewarm
        self.published: list[Report] = []
        self.jit: list[str] = []
        self.hold: dict[str, asyncio.Event] = {}  # a step ("publish", "jit") waits for its event
        self.reached: dict[str, asyncio.Event] = {}  # ... and sets this one when it is reached
        self.rewarms = Rewarms(
            self.state, lambda p, s: self.warm(p, s), self._publish, self._jit,
            served=(Profile.model_validate({"auto": {}}), str(MINIMAL_PROFILE)),
            min_interval=interval, clock=clock,
        )  # fmt: skip
        self.control = Control(self.state, _authorized, self.rewarms, Admin(admin_key))
        self.gate = Gate(self.state, self.control, _authorized)
        self.state.warming(INNER)
        self.state.warmup.where = {"bucket": 1, "buckets": 2, "round": 1}

    async def _step(self, name: str) -> None:
        if name in self.hold:
            self.reached.setdefault(name, asyncio.Event()).set()
            await self.hold[name].wait()

    async def _publish(self, report: Report) -> None:
        await self._step("publish")
        self.published.append(report)

    async def _jit(self, phase: str) -> None:
        await self._step("jit")
        self.jit.append(phase)

    def open(self, summary_of: Report | None = None) -> None:
        self.state.report = summary_of or self.state.report
        self.state.serving()


def _served(admin_key: str | None = "admin-7c1e") -> tuple[Gate, Served]:
    served = Served(admin_key)
    return served.gate, served


def client(gate: Gate, peer: tuple[str, int] | None = OUTSIDE) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=gate, client=peer)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://llmwarm")


async def test_every_warmup_endpoint_is_401_without_its_key_in_every_phase() -> None:
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
            # the API key reads; only the admin key re-warms
            assert (await c.get("/warmup/report", headers=KEY)).status_code == 200
            assert (await c.post("/warmup/run", headers=KEY, json={})).status_code == 401


ISTIO = ("127.0.0.6", 40000)  # an Istio sidecar's address toward the app


@pytest.mark.parametrize(
    ("peer", "headers", "allowed"),
    [
        (OUTSIDE, {}, False),
        (LOOPBACK, {}, False),  # `kubectl port-forward`, `ssh -L`: local, and nothing says so
        (ISTIO, {"x-forwarded-proto": "https", "x-forwarded-client-cert": "By=spiffe://c"}, False),
        (LOOPBACK, {"x-forwarded-for": "198.51.100.7"}, False),  # a local proxy
        (None, {}, True),  # a Unix socket (--uds): no relay reaches it
        (None, {"forwarded": "for=198.51.100.7"}, False),  # a proxy in front of the socket
    ],
    ids=["outside", "loopback", "istio", "local-proxy", "unix-socket", "proxied-socket"],
)
async def test_without_an_admin_key_only_a_unix_socket_client_may_rewarm(
    peer: tuple[str, int] | None, headers: dict[str, str], allowed: bool
) -> None:
    # The defects: any client that reached the port could call POST /warmup/run
    # (`{"close_gate": true}` in a loop keeps every replica out of its Service); then any
    # loopback client without a forwarding header, which an Istio sidecar (127.0.0.6,
    # x-forwarded-proto) and every port-forward or tunnel is.
    gate, served = _served(admin_key=None)
    served.open()
    served.warm = lambda p, s: asyncio.sleep(0, _report())
    async with client(gate, peer) as c:
        run = await c.post("/warmup/run", headers={**KEY, **headers}, json={"close_gate": True})
        without_the_api_key = await c.post("/warmup/run", json={})
    if allowed:
        assert run.status_code == 200
    else:
        assert run.status_code == 403 and "--admin-key" in run.json()["error"]
    assert without_the_api_key.status_code in (401, 403)
    assert len(served.published) == (1 if allowed else 0)


async def test_the_admin_key_rewarms_from_anywhere_and_the_api_key_does_not() -> None:
    gate, served = _served()
    served.open()
    served.warm = lambda p, s: asyncio.sleep(0, _report())
    async with client(gate) as c:
        by_admin = await c.post("/warmup/run", headers=ADMIN, json={})
        by_user = await c.post("/warmup/run", headers=KEY, json={})
        wrong = await c.post("/warmup/run", headers={"authorization": "Bearer admin-7c1f"})
        report = await c.get("/warmup/report", headers=ADMIN)  # the admin key reads nothing
    assert by_admin.status_code == 200
    assert by_user.status_code == wrong.status_code == report.status_code == 401


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
        r = await c.post("/warmup/run", headers=ADMIN, json={})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"


async def test_run_waits_for_the_rewarm_and_returns_its_report() -> None:
    gate, served = _served()
    served.open()
    asked: list[tuple[Profile, str]] = []
    closed: list[bool] = []

    async def warm(profile: Profile, source: str) -> Report:
        asked.append((profile, source))
        closed.append(served.state.gate_closed)
        return _report().model_copy(update={"trigger": "api"})

    served.warm = warm
    async with client(gate) as c:
        r = await c.post("/warmup/run", headers=ADMIN, json={"close_gate": True, "profile": "chat"})
        empty = await c.post("/warmup/run", headers=JSON_ADMIN)  # no body: all defaults
    assert r.status_code == empty.status_code == 200 and r.json()["trigger"] == "api"
    assert [source.rsplit("/", 1)[-1] for _, source in asked] == ["chat.yaml", "minimal.yaml"]
    assert closed == [True, False] and served.state.gate_closed is False
    # a closed gate warms (a compile is the warm-up's); an open one runs beside users (either's)
    assert served.jit == ["warmup", "serving", "rewarm", "serving"]
    assert len(served.published) == 2


async def test_run_without_wait_is_202_and_a_second_run_meanwhile_409() -> None:
    gate, served = _served()
    served.open()
    release = asyncio.Event()

    async def warm(profile: Profile, source: str) -> Report:
        await release.wait()
        return _report()

    served.warm = warm
    async with client(gate) as c:
        started = await c.post("/warmup/run", headers=ADMIN, json={"wait": False})
        again = await c.post("/warmup/run", headers=ADMIN, json={"wait": False})
        release.set()
        assert served.rewarms.task is not None
        await served.rewarms.task
        after = await c.post("/warmup/run", headers=ADMIN, json={"wait": False})
    assert started.status_code == 202 and started.json() == {"status": "started"}
    assert again.status_code == 409
    assert after.status_code == 202
    await served.rewarms.close()


@pytest.mark.parametrize("step", ["publish", "jit"])
async def test_the_gate_reopens_only_when_the_rewarm_is_over_and_published(step: str) -> None:
    # The defect (fresh-clone CI, e2e): the gate reopened before the re-warm had published its
    # report and ended; a client that read /ready 200 then read the old report, and its next
    # POST /warmup/run was a 409 "already running".
    gate, served = _served()
    served.open(_report())
    served.warm = lambda p, s: asyncio.sleep(0, _report().model_copy(update={"trigger": "api"}))
    served.hold[step] = asyncio.Event()
    async with client(gate) as c:
        body = {"close_gate": True, "wait": False}
        started = await c.post("/warmup/run", headers=ADMIN, json=body)
        await served.reached.setdefault(step, asyncio.Event()).wait()
        during = await c.get("/ready")
        busy = await c.post("/warmup/run", headers=ADMIN, json={"wait": False})
        served.hold[step].set()
        while (await c.get("/ready")).status_code != 200:
            await asyncio.sleep(0)
        assert served.rewarms.task is not None and served.rewarms.task.done()
        assert [r.trigger for r in served.published] == ["api"]
        after = await c.post("/warmup/run", headers=ADMIN, json={"wait": False})
    assert started.status_code == 202 and during.status_code == 503 and busy.status_code == 409
    assert after.status_code == 202
    await served.rewarms.close()


def _slow_body(
    body: bytes, arrived: asyncio.Event, waiting: list[None]
) -> Callable[[], Awaitable[dict[str, object]]]:
    """An ASGI `receive` whose body comes only once `arrived` is set (headers long before);
    `waiting` gets an item when the request starts waiting for it."""

    async def receive() -> dict[str, object]:
        waiting.append(None)
        await arrived.wait()
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.001)


def _scope() -> dict[str, object]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/warmup/run", "raw_path": b"/warmup/run",
        "query_string": b"", "root_path": "", "server": ("127.0.0.1", 8000),
        "headers": [(b"authorization", ADMIN["authorization"].encode()),
                    (b"content-type", b"application/json")], "client": OUTSIDE,
    }  # fmt: skip


async def test_two_posts_whose_bodies_arrive_late_start_one_rewarm() -> None:
    # The defect: the 409 check ran before the body was read and the task was made after it;
    # two POSTs whose bodies came after their headers both passed, and two warm-ups drove the
    # engine at once (the first to end reopened a gate the other had closed).
    gate, served = _served()
    served.open()
    running = 0
    most = 0
    release = asyncio.Event()

    async def warm(profile: Profile, source: str) -> Report:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return _report()

    served.warm = warm
    arrived = asyncio.Event()
    answers: list[list[dict[str, object]]] = [[], []]

    async def post(i: int) -> None:
        async def send(message: dict[str, object]) -> None:
            answers[i].append(message)

        receive = _slow_body(b'{"close_gate": true}', arrived, waiting)
        await gate(_scope(), receive, send)  # type: ignore[arg-type]

    waiting: list[None] = []
    posts = [asyncio.create_task(post(i)) for i in range(2)]
    await _until(lambda: len(waiting) == 2)  # both are in, headers read, waiting for bodies
    arrived.set()
    while served.rewarms.task is None:
        await asyncio.sleep(0.005)
    release.set()
    await asyncio.gather(*posts)
    statuses = sorted(
        int(str(m["status"])) for a in answers for m in a if m["type"] == "http.response.start"
    )
    assert statuses == [200, 409] and most == 1
    await served.rewarms.close()


async def test_a_post_whose_body_arrives_after_the_stop_starts_nothing() -> None:
    # The defect: a POST whose body was still arriving when SIGTERM landed started a re-warm
    # after the stop had cancelled the running ones; its failed report overwrote --report.
    gate, served = _served()
    served.open()
    arrived = asyncio.Event()
    answer: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        answer.append(message)

    waiting: list[None] = []
    post = asyncio.create_task(gate(_scope(), _slow_body(b"{}", arrived, waiting), send))  # type: ignore[arg-type]
    await _until(lambda: bool(waiting))  # the POST waits for its body: the bug's window
    served.state.stopping()
    await served.rewarms.close()
    arrived.set()
    await post
    assert [m["status"] for m in answer if m["type"] == "http.response.start"] == [503]
    assert served.rewarms.task is None and served.published == []


async def test_rewarms_are_at_most_one_per_interval() -> None:
    now = [1000.0]  # the re-warms' clock, the test's to move
    served = Served(interval=60.0, clock=lambda: now[0])
    served.open()
    served.warm = lambda p, s: asyncio.sleep(0, _report())
    async with client(served.gate) as c:
        first = await c.post("/warmup/run", headers=ADMIN, json={})
        now[0] += 20.5
        second = await c.post("/warmup/run", headers=ADMIN, json={})
        now[0] += 39.5
        third = await c.post("/warmup/run", headers=ADMIN, json={})
    assert first.status_code == 200
    # 39.5 s left of the interval, rounded up
    assert second.status_code == 429 and second.headers["retry-after"] == "40"
    assert "--rewarm-min-interval" in second.json()["error"]
    assert third.status_code == 200  # the interval is over


async def test_a_failed_rewarm_is_not_published() -> None:
    # The defect: a re-warm that failed in round 1 became the report users saw and what
    # coverage counted as warm, and its partial report overwrote --report.
    gate, served = _served()
    served.open(_report())
    failed = _report().model_copy(update={"error": WarmupFailure(message="HTTP 500")})
    served.warm = lambda p, s: asyncio.sleep(0, failed)
    async with client(gate) as c:
        r = await c.post("/warmup/run", headers=ADMIN, json={"close_gate": True})
    assert r.status_code == 500 and r.json()["error"] == "HTTP 500"
    assert served.published == [] and served.state.gate_closed is False
    assert served.jit == ["warmup", "serving"]


async def test_bad_bodies_name_the_field_and_never_echo_it() -> None:
    gate, control = _served()
    control.open()
    secret = "user-secret-9f3a"
    async with client(gate) as c:
        answers = {
            "unknown field": await c.post("/warmup/run", headers=ADMIN, json={secret: 1}),
            "bad type": await c.post("/warmup/run", headers=ADMIN, json={"close_gate": secret}),
            "no such profile": await c.post("/warmup/run", headers=ADMIN, json={"profile": secret}),
            "path as profile": await c.post(
                "/warmup/run", headers=ADMIN, json={"profile": "../../etc/passwd"}
            ),
            "not json": await c.post("/warmup/run", headers=JSON_ADMIN, content=f"{{{secret}"),
            "not an object": await c.post("/warmup/run", headers=ADMIN, json=[secret]),
        }
        too_big = await c.post("/warmup/run", headers=JSON_ADMIN, content=b" " * 100_000)
    for what, r in answers.items():
        assert r.status_code == 400, what
        assert secret not in r.text, what
        assert r.json()["problems"], what
    assert too_big.status_code == 413
    assert answers["bad type"].json()["problems"][0]["where"] == "close_gate"
    assert answers["no such profile"].json()["problems"][0]["where"] == "profile"


async def test_a_failed_rewarm_answers_with_its_error() -> None:
    gate, control = _served()
    control.open()

    async def warmup_fails(profile: Profile, source: str) -> Report:
        raise WarmupError("warm-up request failed", problems=[("bucket b", "HTTP 500")])

    async def profile_does_not_fit(profile: Profile, source: str) -> Report:
        raise ProfileError("profile does not fit", problems=[("features.use", "needs lora")])

    async with client(gate) as c:
        control.warm = warmup_fails
        failed = await c.post("/warmup/run", headers=ADMIN, json={})
        control.warm = profile_does_not_fit
        misfit = await c.post("/warmup/run", headers=ADMIN, json={})
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
    from llmwarm.model.profile import shipped_names

    assert {"long-context", "structured-output", "default", "minimal"} <= set(shipped_names())
    for name in shipped_names():
        assert RewarmRequest(profile=name).profile == name


async def test_a_web_page_cannot_ask_cross_site_nor_by_dns_rebinding() -> None:
    # The defect: with no keys, POST /warmup/run parsed JSON whatever its Content-Type and
    # checked neither Origin nor Host: a web page in a browser on the same machine closed the
    # gate with a plain-text POST (a "simple" request: no preflight).
    gate, served = _served()
    served.control.host_check = True  # a server with no API key
    served.open(_report())
    served.warm = lambda p, s: asyncio.sleep(0, _report())
    transport = httpx.ASGITransport(app=gate, client=OUTSIDE)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as c:
        plain_text = await c.post(
            "/warmup/run", headers={**ADMIN, "content-type": "text/plain"}, content="{}"
        )
        form = await c.post("/warmup/run", headers=ADMIN, data={"close_gate": "true"})
        cross = await c.post(
            "/warmup/run", headers={**ADMIN, "origin": "https://evil.example"}, json={}
        )
        null_origin = await c.get("/warmup/report", headers={**KEY, "origin": "null"})
        # a DNS name an attacker's page rebound to this address, against an IP literal
        rebound = await c.get("/warmup/report", headers={**KEY, "host": "evil.example:8000"})
        by_address = await c.get("/warmup/report", headers={**KEY, "host": "10.1.2.3:8000"})
        by_localhost = await c.get("/warmup/report", headers={**KEY, "host": "localhost:8000"})
        same_origin = await c.post(
            "/warmup/run", headers={**ADMIN, "origin": "http://127.0.0.1:8000"}, json={}
        )
    assert plain_text.status_code == form.status_code == 415
    assert cross.status_code == null_origin.status_code == rebound.status_code == 403
    assert by_address.status_code == by_localhost.status_code == 200
    assert same_origin.status_code == 200
    assert len(served.published) == 1  # only the same-origin JSON request re-warmed
