"""The shared server of the end-to-end layer: one real `llmwarm serve` of the tiny model, with an
API key and an admin key as in production, that every test needing nothing but a warm server
uses (`served`, a session fixture in conftest.py).

User-like load hits it from the moment the process starts until well after it is ready; what
it saw before ready, and the start-up warm-up's report as it was then (`Served.startup`), are
kept for the tests. Each test isolates itself by its own prompts and what it reads (deltas of
the coverage, its own requests' answers), never by running first or last: a re-warm may have
replaced the report by the time another test runs. At the end of the session the server is
stopped with a long stream in flight, which must drain (`stop_draining`).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from benchmarks.launch import ENGINE_FLAGS, LLMWARM, free_port
from llmwarm.serve.gate import WARMUP_HEADER
from tests.launch import (
    MINIMAL,
    STARTUP_TIMEOUT_S,
    Launch,
    engine_core,
    engine_env,
    engine_processes,
)

API_KEY = "e2e-key-7c1d"
AUTH = {"authorization": f"Bearer {API_KEY}"}
ADMIN_KEY = "e2e-admin-3b9f"  # POST /warmup/run's, given as LLMWARM_ADMIN_KEY
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
LOAD_AFTER_READY = 20  # user requests answered 200 after /ready, before the tests look
# In every body the load sends: no answer of llmwarm's, nor its report, may echo it.
SECRET = "user-secret-5be0"


@dataclass
class Answer:
    request_id: str
    sent: float  # time.monotonic()
    status: int | None  # None: no answer (a transport error)
    retry_after: str | None
    text: str


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    report: Path
    log: Path
    # (path, status, retry-after, JSON body) of every answer seen before /ready was 200
    before_ready: list[tuple[str, int, str | None, dict[str, Any]]] = field(default_factory=list)
    ready_at: float | None = None  # time.monotonic() when /ready was first seen 200
    load: list[Answer] = field(default_factory=list)
    startup: dict[str, Any] = field(default_factory=dict)  # the start-up warm-up's report

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _user_load(served: Served, done: threading.Event, workers: int = 4) -> None:
    """Users who do not wait for /ready: mixed requests, back to back, each with its own
    X-Request-Id (`ext-...`), from process start until `done`."""
    bodies = [
        ("/v1/completions", {"prompt": f"{SECRET} once upon", "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": SECRET}],
                                  "max_tokens": 4, "logprobs": True, "top_logprobs": 2}),
        ("/v1/completions", {"prompt": SECRET, "max_tokens": 4, "stream": True}),
    ]  # fmt: skip

    async def worker(w: int, client: httpx.AsyncClient) -> None:
        i = 0
        while not done.is_set():
            path, body = bodies[i % len(bodies)]
            rid = f"ext-{w}-{i}"
            i += 1
            sent = time.monotonic()
            try:
                r = await client.post(
                    path, json={"model": "tiny", **body}, headers={**AUTH, "x-request-id": rid}
                )
                served.load.append(
                    Answer(rid, sent, r.status_code, r.headers.get("retry-after"), r.text)
                )
            except httpx.ConnectError:
                await asyncio.sleep(0.2)  # not bound yet (the CLI is still importing vLLM)
            except httpx.HTTPError as exc:
                served.load.append(Answer(rid, sent, None, None, repr(exc)))
            await asyncio.sleep(0.05)

    async def main() -> None:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            await asyncio.gather(*(worker(w, client) for w in range(workers)))

    asyncio.run(main())


def _until_answered_after_ready(served: Served, load: threading.Thread) -> None:
    """Until `LOAD_AFTER_READY` user requests sent after /ready was 200 were answered."""
    assert served.ready_at is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and load.is_alive():
        after = [a for a in list(served.load) if a.sent > served.ready_at and a.status == 200]
        if len(after) >= LOAD_AFTER_READY:
            return
        time.sleep(0.05)
    pytest.fail(f"fewer than {LOAD_AFTER_READY} user requests answered after ready")


def _poll_until_ready(served: Served) -> None:
    """Probe like a load balancer (and a forger) until /ready is 200."""
    probes = [
        ("GET", "/ready", AUTH),
        ("GET", "/health", AUTH),
        ("GET", "/v1/models", AUTH),
        ("POST", "/v1/completions", {**AUTH, WARMUP_HEADER: "forged-token"}),
    ]
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    i = 0
    with httpx.Client(base_url=served.url, timeout=10) as client:
        while time.monotonic() < deadline:
            if served.proc.poll() is not None:
                pytest.fail(f"llmwarm exited early:\n{served.log_text()[-3000:]}")
            method, path, headers = probes[i % len(probes)]
            i += 1
            try:
                body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
                r = client.request(method, path, headers=headers, json=body)
            except httpx.TransportError:
                time.sleep(0.2)  # not bound yet (the CLI is still importing vLLM)
                continue
            if r.status_code == 200:
                # The gate opened between probes: /ready must agree (it never closes again).
                assert client.get("/ready").status_code == 200, (path, r.text)
                served.ready_at = time.monotonic()
                return
            served.before_ready.append(
                (path, r.status_code, r.headers.get("retry-after"), r.json())
            )
            time.sleep(0.1)
    pytest.fail(f"not ready after {STARTUP_TIMEOUT_S} s:\n{served.log_text()[-3000:]}")


def shared_server(tiny_model: Path, tmp: Path) -> Iterator[Served]:
    """Start the shared server and its user load; yield it once ready and the load is done;
    stop it draining."""
    port = free_port()
    log = tmp / "llmwarm.log"
    cmd = [
        *LLMWARM, "serve", str(tiny_model), *ENGINE_FLAGS,
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny",
        "--profile", str(MINIMAL), "--report", str(tmp / "report.json"),
        "--api-key", API_KEY,
        "--enable-log-requests",  # the engine logs each request id it runs
        # in-flight requests drain at SIGTERM for up to an hour: the process must end as soon
        # as they are done (stop_draining), never by this timeout
        "--shutdown-timeout", "3600",
        "--rewarm-min-interval", "0",  # the re-warm test sends two in a row
    ]  # fmt: skip
    env = {**engine_env(), "LLMWARM_ADMIN_KEY": ADMIN_KEY}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    s = Served(proc=proc, url=f"http://127.0.0.1:{port}", report=tmp / "report.json", log=log)
    done = threading.Event()
    load = threading.Thread(target=_user_load, args=(s, done), daemon=True)
    load.start()
    try:
        _poll_until_ready(s)
        s.startup = json.loads(s.report.read_text())
        _until_answered_after_ready(s, load)  # the load goes on well after ready
        done.set()
        load.join()  # every user request was answered (a hang is the test's timeout)
        yield s
        stop_draining(s)
    finally:
        done.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop_draining(served: Served) -> None:
    """SIGTERM with a long stream in flight: the stream gets every token, the process ends
    with 0 once it is done (not at its hour of --shutdown-timeout), its engine with it."""
    children = engine_processes(Launch.of(served.proc.pid))
    assert engine_core(children), [p.pid for p in children]
    body = {
        "model": "tiny", "prompt": "drain", "max_tokens": 300, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    usage = None
    with httpx.Client(base_url=served.url, timeout=None, headers=AUTH) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            for i, line in enumerate(r.iter_lines()):
                if i == 2:  # mid-stream
                    served.proc.send_signal(signal.SIGTERM)
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage") or usage
    assert usage is not None and usage["completion_tokens"] == 300  # drained, not cut
    assert served.proc.wait() == 0
    psutil.wait_procs(children)  # every engine process ends (a leak: the test's timeout)
    assert "Traceback" not in served.log_text()
