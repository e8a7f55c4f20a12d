"""The lifecycle of one llmwarm process.

    bind the port (503 from the first moment)
      -> start the vLLM engine (503 "loading")
      -> build vLLM's OpenAI app on that engine (503 "warming" to everyone else)
      -> warm it up over real HTTP through that app, measuring as a client, round after
         round until each bucket's latency has converged
      -> reset the prefix cache, write the report (and plot); apply --on-unconverged
      -> run vLLM's app lifespan and open the gate (serve)
      -> while serving, `POST /warmup/run` may warm it again (llmwarm.control)
      -> on SIGTERM/SIGINT: /ready 503, drain in-flight requests, stop the engine

A warm-up that fails (a request fails, the engine dies) still writes its report, with the
error and what was measured until then.

This module owns the process's signals; nothing else installs handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import socket
import time
from argparse import Namespace
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import httpx
from rich.console import Console

from llmwarm import __version__, caches, engine, metrics, warmup
from llmwarm.control import Control, RewarmRequest
from llmwarm.errors import EXIT_INTERRUPTED, Interrupted, Unconverged, WarmupError
from llmwarm.gate import Gate, Phase
from llmwarm.metrics import Live, WarmupCollector
from llmwarm.profile import (
    EngineShape,
    Profile,
    for_engine,
    load_profile,
    shipped,
    with_adapters,
)
from llmwarm.progress import ProgressView
from llmwarm.report import (
    KvFillResult,
    Problem,
    Report,
    WarmupFailure,
    kinds_table,
    plot,
    table,
    write_json,
)
from llmwarm.settings import Settings

if TYPE_CHECKING:
    import uvicorn
    from starlette.types import ASGIApp

_T = TypeVar("_T")

logger = logging.getLogger(__name__)


def interrupt_on_sigterm() -> None:
    """Before the event loop runs (while vLLM is imported): SIGTERM interrupts like SIGINT.

    A container's PID 1 ignores a signal it has no handler for; without this, a pod deleted
    in its first seconds would wait for SIGKILL.
    """
    signal.signal(signal.SIGTERM, signal.default_int_handler)


@contextlib.contextmanager
def _signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGINT/SIGTERM ask for a graceful stop; a second one forces an exit."""
    loop = asyncio.get_running_loop()

    def handle(sig: signal.Signals) -> None:
        if stop.is_set():
            logger.warning("%s again: forcing exit", sig.name)
            engine.force_exit(EXIT_INTERRUPTED)
        logger.info("%s received: shutting down", sig.name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handle, sig)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _base_url(sock: socket.socket, args: Namespace) -> tuple[str, httpx.AsyncHTTPTransport]:
    """Where the warm-up client reaches this very server."""
    if sock.family == socket.AF_UNIX:
        return "http://localhost", httpx.AsyncHTTPTransport(uds=sock.getsockname())
    host, port = sock.getsockname()[:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if args.ssl_certfile else "http"
    # verify=False: the certificate names the public host, not the loopback we dial.
    return f"{scheme}://{host}:{port}", httpx.AsyncHTTPTransport(verify=False)


def _warmup_client(sock: socket.socket, args: Namespace, gate: Gate) -> httpx.AsyncClient:
    headers = dict(gate.headers)
    if keys := engine.api_keys(args):
        headers["authorization"] = f"Bearer {keys[0]}"
    base_url, transport = _base_url(sock, args)
    return httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=warmup.TIMEOUT, transport=transport
    )


def listen_url(sock: socket.socket, args: Namespace) -> str:
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    scheme = "https" if args.ssl_certfile else "http"
    return f"{scheme}://{host}:{port}"


async def _stop_http(http: uvicorn.Server, task: asyncio.Task[None], grace: int) -> None:
    """Stop the HTTP server, giving in-flight requests `grace` seconds, then cancelling them.

    Always before the engine stops: a request handler must never outlive the engine.
    """
    if not task.done():
        if grace > 0:
            http.config.timeout_graceful_shutdown = grace
        else:
            http.force_exit = True  # no wait at all; the handlers are cancelled below
        http.should_exit = True
        await task
    # Whatever uvicorn gave up on, cancel, and let it unwind (abort its engine request).
    handlers = list(http.server_state.tasks)
    for handler in handlers:
        handler.cancel()
    if handlers:
        await asyncio.wait(handlers, timeout=5)


async def _serve_until_stopped(
    stop: asyncio.Event, http_task: asyncio.Task[None], eng: engine.AsyncLLM
) -> None:
    stopped = asyncio.create_task(stop.wait())
    dead = asyncio.create_task(engine.wait_dead(eng))
    try:
        await asyncio.wait({stopped, dead, http_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        dead.cancel()
    if dead.done() and not dead.cancelled() and not stop.is_set():
        dead.result()  # raises EngineDied


async def _unless_engine_dies(eng: engine.AsyncLLM, work: Awaitable[_T]) -> _T:
    """Await `work`; if the engine dies first (or meanwhile), a `WarmupError` saying so."""
    task = asyncio.ensure_future(work)
    dead = asyncio.create_task(engine.wait_dead(eng))
    try:
        await asyncio.wait({task, dead}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        dead.cancel()
        if not task.done():  # the engine died, or we are cancelled (a signal)
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if not engine.is_dead(eng):
        return task.result()  # the result, or the failure of a request on a live engine
    if not task.cancelled():
        task.exception()  # retrieved: a request that failed because the engine died
    raise WarmupError(
        "the vLLM engine died during the warm-up",
        problems=[("engine", str(eng.dead_error) or "the EngineCore process ended")],
    )


def _write(report: Report, settings: Settings) -> None:
    if settings.report_path is not None:
        write_json(report, settings.report_path)
        logger.info("warm-up report written to %s", settings.report_path)
    if settings.plot_path is not None and report.buckets:
        plot(report, settings.plot_path)
        logger.info("warm-up plot written to %s", settings.plot_path)


def _publish(report: Report, settings: Settings) -> None:
    """Write the report (and plot), show the table, apply the unconverged policy."""
    _write(report, settings)
    console = Console(stderr=True, width=180)
    console.print(table(report))
    console.print(kinds_table(report))
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


@dataclass
class _Lifecycle:
    """One process's run: its settings, gate, HTTP server and (once started) engine."""

    settings: Settings
    gate: Gate
    control: Control
    live: Live
    http: uvicorn.Server
    http_task: asyncio.Task[None]
    sock: socket.socket
    stop: asyncio.Event
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    async def run(self) -> Report:
        start = time.perf_counter()
        async with engine.start_engine(self.settings.vllm_args) as eng:
            self.live.engine_start_s = time.perf_counter() - start
            self._check_cache(eng)
            try:
                return await self._warm_and_serve(eng)
            finally:
                # Interrupted, failed or done: no request may reach the engine after this.
                await _stop_http(self.http, self.http_task, grace=0)

    async def _warm_and_serve(self, eng: engine.AsyncLLM) -> Report:
        settings = self.settings
        args = settings.vllm_args
        logger.info("engine started in %.1f s; warming up", self.live.engine_start_s)
        app = await engine.build_app(eng, args, self.http)
        self.gate.warming(app)
        report = await self._warmup(eng, settings.profile, settings.profile_path, "startup")
        _publish(report, settings)
        if settings.mode == "bake":
            self._bake(eng)
        if not settings.serve:
            return report
        async with engine.app_lifespan(app):
            self.gate.open(report.summary())
            logger.info("warm: serving on %s", listen_url(self.sock, args))
            self.control.rewarm = functools.partial(self._rewarm, eng, app)
            try:
                await _serve_until_stopped(self.stop, self.http_task, eng)
            finally:
                # No re-warm may start or go on (one only runs while serving, so this is the
                # only place to end it), then in-flight user requests drain.
                self.control.rewarm = None
                self.gate.stopping()
                await self.control.close()
                # vLLM's --shutdown-timeout: how long in-flight requests may drain
                await _stop_http(self.http, self.http_task, grace=args.shutdown_timeout)
        return report

    def _baked(self, eng: engine.AsyncLLM) -> caches.Manifest:
        """The manifest of a bake of this engine."""
        return caches.Manifest(
            llmwarm_version=__version__,
            vllm_version=engine.vllm_version(),
            model=self.settings.model,
            config_hash=engine.config_hash(eng),
            engine_start_s=self.live.engine_start_s or 0.0,
        )

    def _check_cache(self, eng: engine.AsyncLLM) -> None:
        """Say whether the engine could start from the caches in --cache-dir."""
        directory = self.settings.cache_dir
        if directory is None or self.settings.mode == "bake":
            return
        baked = caches.read_manifest(directory)
        why = caches.mismatch(baked, self._baked(eng))
        if why is None and baked is not None:
            logger.info(
                "--cache-dir %s: compile caches baked at %s (cold start %.1f s) match this engine",
                directory, baked.baked_at.isoformat(timespec="seconds"), baked.engine_start_s,
            )  # fmt: skip
        else:
            logger.warning("--cache-dir %s: %s; vLLM compiles and caches there now", directory, why)

    def _bake(self, eng: engine.AsyncLLM) -> None:
        directory = self.settings.cache_dir
        assert directory is not None  # settings.resolve requires it for bake
        caches.write_manifest(directory, self._baked(eng))
        size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        logger.info("baked: compile caches in %s (%.1f MB)", directory, size / 1e6)

    async def _warmup(
        self,
        eng: engine.AsyncLLM,
        profile: Profile,
        source: Path,
        trigger: Literal["startup", "api"],
    ) -> Report:
        """Warm up through the app; the report, also when the warm-up failed (then raise)."""
        args = self.settings.vllm_args
        shape = engine.shape(eng, args)
        async with _warmup_client(self.sock, args, self.gate) as client:
            if trigger == "api":  # also every adapter loaded since (/v1/load_lora_adapter)
                adapters = await warmup.served_adapters(client, self.settings.model)
                shape = replace(shape, lora=adapters)
                profile = with_adapters(profile, adapters)
            profile = for_engine(profile, shape)
            self.live.reset(profile.convergence.window)
            try:
                warm = self._warm(eng, profile, shape, client)
                outcome, kv = await _unless_engine_dies(eng, warm)
            except WarmupError as exc:
                failure = WarmupFailure(
                    message=exc.message,
                    problems=[Problem(where=w, message=m) for w, m in exc.problems],
                )
                report = self._report(profile, source, None, None, False, trigger, failure)
                self.control.report = report
                _write(report, self.settings)
                raise
        # Warm-up prompts must leave no state behind that a user could hit.
        reset = await engine.reset_prefix_cache(eng)
        report = self._report(profile, source, outcome, kv, reset, trigger, None)
        self.control.report = report
        return report

    async def _warm(
        self,
        eng: engine.AsyncLLM,
        profile: Profile,
        shape: EngineShape,
        client: httpx.AsyncClient,
    ) -> tuple[warmup.Outcome, KvFillResult | None]:
        live, gate = self.live, self.gate
        view = ProgressView(len(profile.buckets), profile.convergence.metric)

        def on_round(p: warmup.Progress) -> None:
            live.buckets[p.bucket.name] = p.bucket
            live.requests = p.requests
            gate.progress(
                {
                    "bucket": p.bucket_index,
                    "buckets": p.buckets,
                    "name": p.bucket.name,
                    "round": p.round,
                    "requests": p.requests,
                }
            )
            view.update(p)

        def on_fill(blocks: int, target: int) -> None:
            gate.progress({"kv_fill": {"blocks": blocks, "target": target}})

        live.warmup_started = time.perf_counter()
        tokenizer = engine.tokenizer(eng)
        model = self.settings.model
        kv = await warmup.fill_kv(client, profile, shape, tokenizer, model, on_batch=on_fill)
        if kv is not None:
            logger.info(
                "KV-cache fill: %d of %d blocks prefilled once (%d requests, %.1f s)",
                kv.blocks_reached, kv.blocks, kv.requests, kv.seconds,
            )  # fmt: skip
        with view:
            outcome = await warmup.run(client, profile, tokenizer, model, on_round=on_round)
        live.warmup_s = time.perf_counter() - live.warmup_started
        return outcome, kv

    def _report(
        self,
        profile: Profile,
        source: Path,
        outcome: warmup.Outcome | None,
        kv: KvFillResult | None,
        reset: bool,
        trigger: Literal["startup", "api"],
        failure: WarmupFailure | None,
    ) -> Report:
        live = self.live
        if outcome is None:  # failed: what was measured until then
            buckets = list(live.buckets.values())
            for bucket in buckets:
                if bucket.stop_reason == "running":
                    bucket.stop_reason = "failed"
            outcome = warmup.Outcome(
                buckets=buckets, requests=live.requests, budget_exhausted=False
            )
        warmup_s = live.warmup_s
        if warmup_s is None and live.warmup_started is not None:
            warmup_s = time.perf_counter() - live.warmup_started
        return Report(
            llmwarm_version=__version__,
            vllm_version=engine.vllm_version(),
            model=self.settings.model,
            profile=str(source),
            started_at=self.started_at,
            engine_start_s=live.engine_start_s or 0.0,
            warmup_s=warmup_s or 0.0,
            requests=outcome.requests,
            prefix_cache_reset=reset,
            convergence=profile.convergence,
            on_unconverged=self.settings.on_unconverged,
            budget_exhausted=outcome.budget_exhausted,
            kv_fill=kv,
            trigger=trigger,
            error=failure,
            buckets=outcome.buckets,
        )

    async def _rewarm(self, eng: engine.AsyncLLM, app: ASGIApp, request: RewarmRequest) -> Report:
        """`POST /warmup/run`: warm the serving engine again, closing the gate if asked."""
        profile, source = self.settings.profile, self.settings.profile_path
        if request.profile is not None:
            source = shipped(request.profile)
            profile = load_profile(source)
        if request.close_gate:
            self.gate.warming(app)
        try:
            report = await self._warmup(eng, profile, source, "api")
        finally:
            if self.gate.phase is Phase.WARMING:
                self.gate.open(self.gate.summary)
        _write(report, self.settings)
        logger.info(
            "re-warm done: %d requests in %.1f s, converged %s",
            report.requests, report.warmup_s, report.converged,
        )  # fmt: skip
        return report


async def run(settings: Settings) -> Report:
    """Run llmwarm to the end: serve until a signal (`serve`), or warm and return (`warm`)."""
    args = settings.vllm_args
    authorized = engine.authorizer(args)
    control = Control(authorized)
    gate = Gate(control, authorized)
    _, sock = engine.bind(args)
    http = engine.http_server(gate, args)
    http_task = asyncio.create_task(http.serve(sockets=[sock]))
    logger.info("listening on %s (503 until warm)", listen_url(sock, args))
    stop = asyncio.Event()
    live = Live(window=settings.profile.convergence.window)
    lifecycle = _Lifecycle(settings, gate, control, live, http, http_task, sock, stop)
    with _signals(stop), metrics.registered(WarmupCollector(gate, live)):
        life = asyncio.create_task(lifecycle.run())
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({life, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not life.done() and gate.phase is not Phase.READY:
                phase = gate.phase.value
                life.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await life
                raise Interrupted(f"interrupted while {phase}; the engine was shut down")
            return await life
        finally:
            stopped.cancel()
            await _stop_http(http, http_task, grace=0)
            sock.close()


def run_sync(settings: Settings) -> Report:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - vLLM depends on uvloop
        return asyncio.run(run(settings))
    return uvloop.run(run(settings))
