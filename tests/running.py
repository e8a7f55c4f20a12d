"""A lifecycle running in the test's process on a fake engine (tests/fakes.py), and a client of
its real loopback socket: the harness of tests/test_server.py and tests/test_adapters.py
(their fixtures `vllm_args`, `settings` and `running` are in conftest.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmwarm.backend.vllm_args import parse_args
from llmwarm.model.profile import load_profile
from llmwarm.model.report import Report
from llmwarm.serve.server import Lifecycle
from llmwarm.serve.settings import Settings
from llmwarm.serve.state import Stage
from tests.fakes import MINIMAL_PROFILE, FakeEngine

ADMIN_KEY = "admin-5e2b"  # POST /warmup/run's (over TCP, it needs one)
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def vllm_args() -> Callable[..., Any]:
    """vLLM's own parser (no engine): the lifecycle reads its frontend flags."""

    def parse(*flags: str) -> Any:
        argv = ["fake/model", "--host", "127.0.0.1", "--port", "0", *flags]
        return parse_args(argv, "test")

    return parse


@pytest.fixture
def settings(tmp_path: Path, vllm_args: Callable[..., Any]) -> Callable[..., Settings]:
    def make(*flags: str) -> Settings:
        return Settings(
            vllm_args=vllm_args(*flags),
            profile=load_profile(MINIMAL_PROFILE),
            profile_path=MINIMAL_PROFILE,
            report_path=tmp_path / "report.json",
            plot_path=None,
            on_unconverged="serve",
            mode="serve",
            admin_key=ADMIN_KEY,
        )

    return make


class Run:
    """A lifecycle running in this process, and a client of its socket."""

    def __init__(self, life: Lifecycle, eng: FakeEngine) -> None:
        self.life, self.eng = life, eng
        self.task: asyncio.Task[Report] = asyncio.create_task(life.run())
        host, port = life.http.sock.getsockname()[:2]
        self.client = httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10, headers=ADMIN)

    async def until(self, stage: Stage) -> None:
        while self.life.state.stage is not stage:
            assert not self.task.done(), self.task
            await asyncio.sleep(0.005)

    async def seen(self) -> None:
        """Until a request is held by the fake engine; fails at once if the lifecycle ends."""
        seen = asyncio.create_task(self.eng.seen.wait())
        await asyncio.wait({seen, self.task}, return_when=asyncio.FIRST_COMPLETED)
        seen.cancel()
        assert self.eng.seen.is_set(), f"the lifecycle ended first: {self.task}"

    async def stopping_with_a_request_in_flight(self) -> asyncio.Task[httpx.Response]:
        """A user request held by the engine, then SIGTERM: the lifecycle is stopping (draining)
        with it in flight; the engine answers it once released."""
        self.eng.holding()
        body = {"model": "fake/model", "prompt": "hi", "max_tokens": 3}
        in_flight = asyncio.create_task(self.client.post("/v1/completions", json=body))
        await self.seen()
        await self.sigterm()
        await self.until(Stage.STOPPING)
        return in_flight

    async def forced(self, forced: list[int], in_flight: asyncio.Task[httpx.Response]) -> None:
        """Until the exit was forced (130), then let the lifecycle end."""
        while not forced:
            await asyncio.sleep(0.005)
        assert forced == [130]
        self.eng.release()
        await in_flight
        await self.task

    async def sigterm(self) -> None:
        # Only ever while the lifecycle runs: its handlers are installed then.
        assert not self.task.done()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0)


@pytest.fixture
async def running(settings: Callable[..., Settings]) -> AsyncIterator[Callable[..., Run]]:
    runs: list[Run] = []

    def start(eng: FakeEngine, *flags: str, **fields: Any) -> Run:
        run = Run(Lifecycle(dataclasses.replace(settings(*flags), **fields), start=eng.start), eng)
        runs.append(run)
        return run

    yield start
    for run in runs:
        await run.client.aclose()
        if not run.task.done():
            run.task.cancel()
        await asyncio.gather(run.task, return_exceptions=True)
