"""The lifecycle of one llmwarm process.

    bind the port (503 from the first moment)
      -> start the vLLM engine (503 "loading")
      -> build vLLM's OpenAI app on that engine (503 "warming" to everyone else)
      -> warm it up over real HTTP through that app, measuring as a client, round after
         round until each bucket's latency has converged
      -> reset the prefix cache, write the report (and plot); apply --on-unconverged
      -> run vLLM's app lifespan and open the gate (serve)
      -> on SIGTERM/SIGINT: /ready 503, drain in-flight requests, stop the engine

This module owns the process's signals; nothing else installs handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from argparse import Namespace
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import httpx
from rich.console import Console

from llmwarm import __version__, engine, metrics, warmup
from llmwarm.errors import EXIT_INTERRUPTED, Interrupted, Unconverged
from llmwarm.gate import Gate, Phase
from llmwarm.metrics import Live, WarmupCollector
from llmwarm.profile import EngineShape, Profile, for_engine
from llmwarm.progress import ProgressView
from llmwarm.report import KvFillResult, Report, kinds_table, plot, table, write_json
from llmwarm.settings import Settings

if TYPE_CHECKING:
    import uvicorn

logger = logging.getLogger(__name__)


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
    if args.api_key:
        keys = args.api_key if isinstance(args.api_key, list) else [args.api_key]
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


async def _warm(
    settings: Settings,
    profile: Profile,
    shape: EngineShape,
    gate: Gate,
    live: Live,
    eng: engine.AsyncLLM,
    sock: socket.socket,
) -> tuple[warmup.Outcome, KvFillResult | None]:
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
    async with _warmup_client(sock, settings.vllm_args, gate) as client:
        kv = await warmup.fill_kv(
            client, profile, shape, tokenizer, settings.model, on_batch=on_fill
        )
        if kv is not None:
            logger.info(
                "KV-cache fill: %d of %d blocks prefilled once (%d requests, %.1f s)",
                kv.blocks_reached, kv.blocks, kv.requests, kv.seconds,
            )  # fmt: skip
        with view:
            outcome = await warmup.run(
                client, profile, tokenizer, settings.model, on_round=on_round
            )
    live.warmup_s = time.perf_counter() - live.warmup_started
    return outcome, kv


def _publish(report: Report, settings: Settings) -> None:
    """Write the report (and plot), show the table, apply the unconverged policy."""
    if settings.report_path is not None:
        write_json(report, settings.report_path)
        logger.info("warm-up report written to %s", settings.report_path)
    if settings.plot_path is not None:
        plot(report, settings.plot_path)
        logger.info("warm-up plot written to %s", settings.plot_path)
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


async def _lifecycle(
    settings: Settings,
    gate: Gate,
    live: Live,
    http: uvicorn.Server,
    http_task: asyncio.Task[None],
    sock: socket.socket,
    stop: asyncio.Event,
) -> Report:
    started_at = datetime.now(timezone.utc)
    start = time.perf_counter()
    async with engine.start_engine(settings.vllm_args) as eng:
        live.engine_start_s = time.perf_counter() - start
        try:
            return await _warm_and_serve(
                settings, gate, live, eng, http, http_task, sock, stop, started_at
            )
        finally:
            # Interrupted, failed or done: no request may reach the engine after this.
            await _stop_http(http, http_task, grace=0)


async def _warm_and_serve(
    settings: Settings,
    gate: Gate,
    live: Live,
    eng: engine.AsyncLLM,
    http: uvicorn.Server,
    http_task: asyncio.Task[None],
    sock: socket.socket,
    stop: asyncio.Event,
    started_at: datetime,
) -> Report:
    args = settings.vllm_args
    logger.info("engine started in %.1f s; warming up", live.engine_start_s)
    app = await engine.build_app(eng, args, http)
    shape = engine.shape(eng, args)
    profile = for_engine(settings.profile, shape)
    gate.warming(app)
    outcome, kv = await _warm(settings, profile, shape, gate, live, eng, sock)
    # Warm-up prompts must leave no state behind that a user could hit.
    reset = await engine.reset_prefix_cache(eng)
    report = Report(
        llmwarm_version=__version__,
        vllm_version=engine.vllm_version(),
        model=settings.model,
        profile=str(settings.profile_path),
        started_at=started_at,
        engine_start_s=live.engine_start_s or 0.0,
        warmup_s=live.warmup_s or 0.0,
        requests=outcome.requests,
        prefix_cache_reset=reset,
        convergence=profile.convergence,
        on_unconverged=settings.on_unconverged,
        budget_exhausted=outcome.budget_exhausted,
        kv_fill=kv,
        buckets=outcome.buckets,
    )
    _publish(report, settings)
    if not settings.serve:
        return report
    async with engine.app_lifespan(app):
        gate.open(report.summary())
        logger.info("warm: serving on %s", listen_url(sock, args))
        try:
            await _serve_until_stopped(stop, http_task, eng)
        finally:
            gate.stopping()
            # vLLM's --shutdown-timeout: how long in-flight requests may drain
            await _stop_http(http, http_task, grace=args.shutdown_timeout)
    return report


async def run(settings: Settings) -> Report:
    """Run llmwarm to the end: serve until a signal (`serve`), or warm and return (`warm`)."""
    stop = asyncio.Event()
    gate = Gate()
    args = settings.vllm_args
    _, sock = engine.bind(args)
    http = engine.http_server(gate, args)
    http_task = asyncio.create_task(http.serve(sockets=[sock]))
    logger.info("listening on %s (503 until warm)", listen_url(sock, args))
    live = Live(window=settings.profile.convergence.window)
    with _signals(stop), metrics.registered(WarmupCollector(gate, live)):
        life = asyncio.create_task(_lifecycle(settings, gate, live, http, http_task, sock, stop))
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
