"""The lifecycle of one llmwarm process, in explicit stages (`llmwarm.serve.state.Stage`):

    bind the port (503 from the first moment; `llmwarm.backend.frontend`)
    starting   start the vLLM engine; the gate answers "loading"
    warming    build vLLM's OpenAI app on that engine and warm it up over real HTTP through
               that app (`llmwarm.warmup.run`); the gate lets only the warm-up through
               -> write the report (and plot), apply --on-unconverged
    serving    run vLLM's app lifespan and open the gate; `POST /warmup/run` may warm it
               again (closing the gate meanwhile if asked: the stage stays `serving`)
    stopping   /ready 503, drain in-flight requests (--shutdown-timeout), stop the engine

A SIGTERM/SIGINT before `serving` interrupts (exit 130); while serving it drains (exit 0).
The stage decides which, never the gate's phase. A second SIGINT (Ctrl-C again) forces the
exit; a second SIGTERM forces only `SAME_STOP_S` or more after the first: `timeout` and
`kill -- -PGID` deliver one SIGTERM to llmwarm directly and one through its process group at
the same instant, and that is one request to stop. (systemd's default stop signals every
process of the unit, the engine's too: deploy/systemd/llmwarm.service sets KillMode=mixed.)

This module owns the process's signals; nothing else installs handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from argparse import Namespace
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from rich.console import Console

from llmwarm import __version__
from llmwarm.backend import caches, engine, frontend, vllm_args
from llmwarm.backend.frontend import Frontend
from llmwarm.errors import (
    EXIT_INTERRUPTED,
    EngineDied,
    Interrupted,
    ServerStopped,
    Unconverged,
    WarmupError,
    WriteError,
    render,
)
from llmwarm.model.fit import for_adapter
from llmwarm.model.profile import Profile
from llmwarm.model.report import AdapterWarmup, Origin, Report, WarmupFailure
from llmwarm.serve import metrics, outputs, startup
from llmwarm.serve.access import Admin
from llmwarm.serve.control import Control
from llmwarm.serve.display import summary
from llmwarm.serve.gate import Gate
from llmwarm.serve.metrics import WarmupCollector
from llmwarm.serve.rewarm import Rewarms
from llmwarm.serve.settings import Settings
from llmwarm.serve.state import RunState, Stage
from llmwarm.traffic import learn
from llmwarm.traffic.coverage import Warmed
from llmwarm.warmup.client import ClientProcess
from llmwarm.warmup.run import WarmupRun, died_warming

if TYPE_CHECKING:
    from starlette.types import ASGIApp

logger = logging.getLogger(__name__)

StartEngine = Callable[
    [Namespace, Callable[[str], None]], AbstractAsyncContextManager[engine.EngineClient]
]


def _signalled(signum: int, frame: object) -> None:
    """Before the event loop's handlers (while vLLM is imported, at the hand-over) and after
    them: end at once with 130. Nothing needs cleaning up then: no engine runs, no file is
    being written. Not an exception: raised inside an import, library code can turn it into
    another (a class body's `__set_name__` wraps it in a RuntimeError: a traceback and exit 1),
    and CPython marks a plain KeyboardInterrupt that escapes code run through its C API as a
    SIGINT death (exit -2); the sweep in tests/test_signals.py met both."""
    os.write(2, f"{signal.Signals(signum).name}: interrupted.\n".encode())
    os._exit(EXIT_INTERRUPTED)


def interrupt_on_signals() -> None:
    """Before the event loop runs (while vLLM is imported): SIGINT and SIGTERM end the process
    at once (130).

    A container's PID 1 ignores a signal it has no handler for; without this, a pod deleted
    in its first seconds would wait for SIGKILL.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _signalled)


# A second SIGTERM sooner than this after the first is the same request to stop (see above).
SAME_STOP_S = 1.0


@contextlib.contextmanager
def _signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGINT/SIGTERM ask for a graceful stop; a second SIGINT, or a second SIGTERM
    `SAME_STOP_S` later, forces an exit."""
    loop = asyncio.get_running_loop()
    first_at = 0.0

    def handle(sig: signal.Signals) -> None:
        nonlocal first_at
        now = time.monotonic()
        if stop.is_set():
            if sig is signal.SIGTERM and now - first_at < SAME_STOP_S:
                logger.info("SIGTERM again at once (a process group's signal): still stopping")
                return
            logger.warning("%s again: forcing exit", sig.name)
            engine.force_exit(EXIT_INTERRUPTED)
        logger.info("%s received: shutting down", sig.name)
        first_at = now
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handle, sig)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        interrupt_on_signals()  # asyncio put back the defaults: a late signal kills no more


async def _serve_until_stopped(
    stop: asyncio.Event, http: Frontend, eng: engine.EngineClient
) -> None:
    """Until a signal asks to stop; `EngineDied` once the engine dies (or vLLM's own error
    handler finds it dead), `ServerStopped` if the HTTP server ends unasked: never exit 0."""
    assert http.task is not None  # serving
    waits = {
        asyncio.create_task(stop.wait()),
        asyncio.create_task(engine.wait_dead(eng)),
        asyncio.create_task(http.vllm_stop.asked.wait()),
    }
    try:
        await asyncio.wait({*waits, http.task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
    if stop.is_set():
        return  # asked to stop: drain, whatever else happened meanwhile
    if eng.is_dead() or http.vllm_stop.asked.is_set():
        raise EngineDied(
            f"the vLLM engine died: {eng.dead_reason()}",
            problems=[("engine", "the EngineCore process ended; see the log above")],
        )
    raise ServerStopped(
        "the HTTP server stopped while serving", problems=[("http", "see the log above")]
    )


async def _watch_jit(eng: engine.EngineClient, state: RunState, every: float = 10.0) -> None:
    """While serving, keep the JIT-monitor counts for `/metrics` fresh (one cheap RPC)."""
    while True:
        await asyncio.sleep(every)
        # A failed read (the engine dying: the lifecycle's watchdog reports that) keeps the
        # last counts.
        with contextlib.suppress(Exception):
            state.jit = await eng.jit_events()


def _show_and_judge(report: Report, settings: Settings) -> None:
    """Show the tables of the start-up warm-up and apply the unconverged policy."""
    Console(stderr=True).print(summary(report, settings.report_path))
    if report.converged:
        return
    unconverged = ", ".join(report.unconverged)
    why = "the warm-up budget ran out" if report.budget_exhausted else "max_rounds was reached"
    if settings.on_unconverged == "fail":
        raise Unconverged(
            f"not warm: {why} before every bucket converged (--on-unconverged fail)",
            problems=[(f"bucket {b}", "did not converge") for b in report.unconverged],
        )
    logger.warning("serving although %s before these buckets converged: %s", why, unconverged)


class Lifecycle:
    """One process's run: start, warm, publish, serve, stop. It alone writes the run state."""

    def __init__(self, settings: Settings, start: StartEngine = engine.start_engine) -> None:
        args = settings.vllm_args
        authorized = frontend.authorizer(args)
        self.settings = settings
        self.state = RunState(window=settings.profile.convergence.window)
        baked = settings.cache.baked if settings.cache is not None else None
        self.state.earlier = startup.earlier(settings.report_path, baked)
        self.rewarms = Rewarms(
            self.state, self._rewarm_once, self._publish, self._jit_phase,
            served=(settings.profile, str(settings.profile_path)),
            min_interval=settings.rewarm_interval_s,
            warm_adapter=self._warm_adapter, publish_adapter=self._publish_adapter,
        )  # fmt: skip
        admin, keyless = Admin(settings.admin_key), not frontend.api_keys(args)
        self.control = Control(self.state, authorized, self.rewarms, admin, host_check=keyless)
        self.gate = Gate(self.state, self.control, authorized)
        self.gate.adapters.owner = self.rewarms
        self.stop = asyncio.Event()
        self.started_at = datetime.now(timezone.utc)
        self._start = start
        self._warmups: WarmupRun | None = None  # once the engine runs
        self.state.coverage.served = frozenset(vllm_args.served_names(args))
        self._learn_writable = outputs.read_learned(settings, self.state.coverage)
        # this process's file in a learn directory, in use while it lives (`learn.claim`): a
        # server's (`warm` and `bake` serve nobody, and write none)
        self._learn_claim = (
            learn.claim(settings.learn_path) if settings.learn_path and settings.serve else None
        )
        self.http = Frontend(self.gate, args)
        self.client = _warmup_client(self.http.warmup_url, self.gate, args)

    async def run(self) -> Report:
        """Run to the end: serve until a signal (`serve`), or warm and return (`warm`)."""
        self.http.start()
        self.client.start()  # its spawn beside the engine's start, not on the warm-up's clock
        logger.info("listening on %s (503 until warm)", self.http.listen_url)
        with _signals(self.stop), metrics.registered(WarmupCollector(self.state)):
            life = asyncio.create_task(self._live())
            stopped = asyncio.create_task(self.stop.wait())
            try:
                await asyncio.wait({life, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not life.done() and self.state.stage is not Stage.SERVING:
                    phase = self.state.phase.value
                    engine.pause("interrupt")  # tests: a second signal lands while stopping
                    life.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await life
                    raise Interrupted(f"interrupted while {phase}; the engine was shut down")
                return await life
            finally:
                stopped.cancel()
                await self.http.stop(grace=0)
                self.http.close()
                self.client.close()
                if self._learn_claim is not None:
                    learn.release(self._learn_claim, self.settings.learn_path)

    async def _live(self) -> Report:
        settings = self.settings
        self.state.engine_starting()
        async with self._start(settings.vllm_args, self.state.engine_loading) as eng:
            self.state.engine_start_s = eng.start_s
            logger.info("engine started in %.1f s; warming up", eng.start_s)
            if settings.cache is not None and settings.mode != "bake":
                settings.cache.check(outputs.manifest(settings, eng))
            try:
                app = await eng.build_app(self.http.vllm_stop)
                self.state.warming(app)
                report = await self._warm_at_start(eng)
                if settings.cache is not None:
                    await self._publish_caches(settings.cache, eng)
                if settings.serve:
                    await self._serve(eng, app)
                elif eng.is_dead():  # `warm`, `bake`: the engine had to live to the end
                    raise died_warming(eng)
                return report
            except Exception as exc:
                # The stage at the death decides the exit code, whichever path noticed it
                # first (the warm-up's watchdog, a request, vLLM's error handler, a call to
                # the engine): before the gate opened the warm-up failed (4), after it serving
                # ended (5, `_serve_until_stopped`).
                if eng.is_dead() and self.state.stage in (Stage.STARTING, Stage.WARMING):
                    raise await self._failed_warming(eng) from exc
                raise
            finally:
                # Interrupted, failed or done: no request may reach the engine after this.
                await self.http.stop(grace=0)

    async def _publish_caches(self, cache: caches.Cache, eng: engine.EngineClient) -> None:
        """What this start compiled, into the shared --cache-dir (`Cache.publish`; a bake
        publishes whatever is there). A failure (a full disk, a lost NFS mount) fails a bake,
        whose product it is; a server logs it, counts it and serves on."""
        bake = self.settings.mode == "bake"
        try:
            report = self.state.report
            made = outputs.manifest(self.settings, eng, report.warmup_s if report else None)
            await asyncio.to_thread(cache.publish, made, force=bake)
        except OSError as exc:
            self.state.write_failures["caches"] += 1
            error = WriteError(
                f"cannot publish the compile caches to {cache.shared}",
                problems=[("--cache-dir", f"{cache.shared}: {exc.strerror or exc}")],
            )
            if bake:
                raise error from None
            logger.error("%s; serving on", "\n".join(render(error.message, error.problems)))

    async def _failed_warming(self, eng: engine.EngineClient) -> WarmupError:
        """An engine that died before the gate opened: the warm-up failed, and the report
        says so (also when the death came after its last request)."""
        error = died_warming(eng)
        report = self.state.report
        if report is not None and report.trigger == "startup" and report.error is None:
            await self._publish(report.model_copy(update={"error": WarmupFailure.of(error)}))
        return error

    async def _warm_at_start(self, eng: engine.EngineClient) -> Report:
        """The start-up warm-up, published; raised as a `WarmupError` if it failed, as
        `Unconverged` if the policy says so."""
        settings = self.settings
        shape = eng.shape()
        self.state.coverage.max_running = shape.max_num_seqs
        self.state.coverage.max_model_len = shape.max_model_len
        self.gate.recording.served = shape.endpoints  # what /invocations may run
        learn_file = str(settings.learn_path) if settings.learn_path else None
        self._warmups = WarmupRun(eng, self.state, self._origin(eng), self.client, learn_file)
        report = await self._warmups(settings.profile, str(settings.profile_path), "startup")
        await self._publish(report)
        if report.error is not None:
            raise WarmupError(report.error.message, problems=report.error.problems)
        _show_and_judge(report, settings)
        return report

    async def _serve(self, eng: engine.EngineClient, app: ASGIApp) -> None:
        async with eng.app_lifespan(app):
            await eng.jit_phase("serving")  # from now on a compile is a user's spike
            if eng.is_dead():  # the gate never opens on a dead engine
                raise died_warming(eng)
            self.state.serving()
            logger.info("warm: serving on %s", self.http.listen_url)
            watches = [asyncio.create_task(_watch_jit(eng, self.state))]
            learned = functools.partial(outputs.write_learned, self.state, self.settings)
            if self._learn_writable:
                watches.append(asyncio.create_task(outputs.keep_learning(learned)))
            try:
                await _serve_until_stopped(self.stop, self.http, eng)
            finally:
                for watch in watches:
                    watch.cancel()
                # No re-warm may start or go on, then in-flight user requests drain.
                self.state.stopping()
                await self.rewarms.close()
                # vLLM's --shutdown-timeout: how long in-flight requests may drain
                await self.http.stop(grace=self.settings.vllm_args.shutdown_timeout)
                if self._learn_writable:
                    await learned()

    async def _publish(self, report: Report) -> None:
        """A warm-up's report becomes the one the server shows and writes (keeping the
        adapters loaded since the start); a finished one also adds what it warmed to the
        coverage's warm kinds and shapes."""
        if (last := self.state.report) is not None and last.adapters and not report.adapters:
            report = report.model_copy(update={"adapters": last.adapters})
        self.state.report = report
        if report.error is None:
            self.state.coverage.warmed_more(Warmed.from_report(report))
        if report.learned is not None:
            learned = report.learned
            logger.info(
                "learned from %s: buckets %s; kinds %s", learned.file,
                ", ".join(learned.buckets) or "none", ", ".join(learned.kinds) or "none",
            )  # fmt: skip
        # a plot, a slow disk: off the loop
        await asyncio.to_thread(outputs.write_report, report, self.settings, self.state)

    async def _rewarm_once(self, profile: Profile, source: str) -> Report:
        assert self._warmups is not None  # serving: the engine runs
        return await self._warmups(profile, source, "api")

    async def _warm_adapter(self, name: str) -> Report:
        """A LoRA adapter loaded at run time, warmed (`llmwarm.serve.lora`)."""
        assert self._warmups is not None
        profile, source = self.rewarms.served
        return await self._warmups(for_adapter(profile, name), source, "adapter")

    async def _publish_adapter(
        self, name: str, report: Report, loaded: float, waited: float
    ) -> None:
        """An adapter's warm-up into the report the server shows and writes (its kinds warm
        for the coverage, when it finished)."""
        if report.error is None:
            self.state.coverage.warmed_more(Warmed.from_report(report))
        ago = time.perf_counter() - loaded
        entry = AdapterWarmup(
            name=name, loaded_at=datetime.now(timezone.utc) - timedelta(seconds=ago),
            warm_after_s=waited, warmup_s=report.warmup_s, requests=report.requests,
            converged=report.converged, kinds=report.kinds, error=report.error,
        )  # fmt: skip
        last = self.state.report
        if last is None:  # (a start-up warm-up is published before the gate opens)
            return
        adapters = [a for a in last.adapters if a.name != name] + [entry]
        self.state.report = last.model_copy(update={"adapters": adapters})
        await asyncio.to_thread(outputs.write_report, self.state.report, self.settings, self.state)

    async def _jit_phase(self, phase: str) -> None:
        assert self._warmups is not None
        await self._warmups.engine.jit_phase(phase)

    def _origin(self, eng: engine.EngineClient) -> Origin:
        return _origin(self.settings, self.started_at, eng)


def _warmup_client(url: str, gate: Gate, args: Namespace) -> ClientProcess:
    """The warm-up's client, of the private warm-up listener (which the gate lets through
    while warming), in a process of its own (`llmwarm.warmup.client`)."""
    headers = dict(gate.headers)
    if keys := frontend.api_keys(args):
        headers["authorization"] = f"Bearer {keys[0]}"
    return ClientProcess(url, headers)


def _origin(settings: Settings, started_at: datetime, eng: engine.EngineClient) -> Origin:
    return Origin(
        llmwarm_version=__version__,
        vllm_version=eng.vllm_version,
        model=settings.model,
        started_at=started_at,
        engine_start_s=eng.start_s,
        on_unconverged=settings.on_unconverged,
        capture_sizes=settings.capture,
    )


def run_sync(settings: Settings) -> Report:
    async def main() -> Report:
        # Until the lifecycle's handlers are in, a signal is still the import-time one's.
        engine.pause("handover")
        return await Lifecycle(settings).run()

    try:
        import uvloop
    except ImportError:  # pragma: no cover - vLLM depends on uvloop
        return asyncio.run(main())
    return uvloop.run(main())
