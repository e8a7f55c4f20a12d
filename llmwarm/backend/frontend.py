"""vLLM's HTTP frontend with llmwarm's gate in front: the other half of the vLLM adapter.

    bind            the port, by vLLM's own `setup_server`, before the engine loads
    Frontend        uvicorn serving the gate there, configured exactly as vLLM's `serve_http`
                    configures it (`serve_http_kwargs`: TLS, mTLS, certificate refresh, header
                    limits, keep-alive, access log), and a private loopback listener for the
                    warm-up alone
    vllm_app        vLLM's OpenAI app on a started engine, and its lifespan

vLLM's `serve_http` cannot be called with the gate in front: it installs its own signal
handlers and, on a signal, stops the engine before the HTTP server, the reverse of a drain. So
this module calls vLLM's pieces (`setup_server`, `NoSignalServer`, `SSLCertRefresher`,
`get_uvicorn_log_config`, `build_app`, `init_app_state`) and passes on every argument vLLM's
`build_and_serve` passes; `tests/test_frontend.py` fails when vLLM's passes one more.

The warm-up talks to the same gate and app over its own listener on loopback (plain HTTP,
left out of the access log), so TLS and mTLS (`--ssl-cert-reqs 2`: the operator's CA signs no
certificate of llmwarm's) never stand in its way, and a flood of user connections on the
public port never delays it. That listener answers only requests that carry the warm-up
token.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from argparse import Namespace
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, cast

import uvicorn

from llmwarm.errors import PortInUse, VllmArgsError

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.types import ASGIApp, Receive, Scope, Send


def api_keys(args: Namespace) -> list[str]:
    """The API keys vLLM's server accepts: --api-key, else VLLM_API_KEY (as vLLM decides)."""
    from vllm import envs

    return [key for key in (args.api_key or [envs.VLLM_API_KEY]) if key]


def authorizer(args: Namespace) -> Callable[[Request], bool]:
    """Whether a request carries one of the API keys, checked exactly as vLLM checks `/v1/*`.

    Always true when the server has no key.
    """
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    keys = api_keys(args)
    if not keys:
        return lambda request: True
    check = AuthenticationMiddleware(app=None, tokens=keys)
    return lambda request: bool(check.verify_token(request.headers))


def bind(args: Namespace) -> tuple[str, socket.socket]:
    """Bind the HTTP socket before the engine loads, as `vllm serve` does: its URL and it."""
    from vllm.entrypoints.launchers.launcher import setup_server

    try:
        url, sock = setup_server(args, reuse_port=False)
    except OSError as exc:
        _close_sockets(exc)
        where = args.uds or f"{args.host or '0.0.0.0'}:{args.port}"
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(
                f"cannot listen on {where}: address already in use",
                problems=[("--uds" if args.uds else "--port", f"{where} is already in use")],
            ) from None
        raise PortInUse(
            f"cannot listen on {where}: {exc.strerror}",
            problems=[("--uds" if args.uds else "--host/--port", str(exc))],
        ) from None
    except (KeyError, ValueError) as exc:
        raise VllmArgsError("bad vLLM arguments", problems=[("vllm flags", str(exc))]) from None
    if not args.uds and not args.port:
        # vLLM's URL names the flag's port; asked for any (`warm`), name the one bound
        url = f"{url.rsplit(':', 1)[0]}:{sock.getsockname()[1]}"
    return url, sock


def _close_sockets(exc: BaseException) -> None:
    """Close the socket a failed bind leaves open: vLLM's `create_server_socket` creates it,
    and its `bind` raises with it held in the frame (a process that serves on after the
    failure, as `llmwarm warm` in a test run does, would leak it until a garbage collection)."""
    tb = exc.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, socket.socket):
                value.close()
        tb = tb.tb_next


def serve_http_kwargs(args: Namespace) -> dict[str, Any]:
    """What vLLM's `build_and_serve` passes to `serve_http` for these arguments (its app,
    socket and `peer_loads`, for several API servers, aside)."""
    from vllm import envs
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config

    kwargs: dict[str, Any] = {}
    log_config = get_uvicorn_log_config(args)
    if log_config is not None:
        kwargs["log_config"] = log_config
    return {
        "enable_ssl_refresh": args.enable_ssl_refresh,
        "host": args.host,
        "port": args.port,
        "log_level": args.uvicorn_log_level,
        "access_log": not args.disable_uvicorn_access_log,
        "timeout_keep_alive": envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
        "ssl_keyfile": args.ssl_keyfile,
        "ssl_certfile": args.ssl_certfile,
        "ssl_ca_certs": args.ssl_ca_certs,
        "ssl_cert_reqs": args.ssl_cert_reqs,
        "ssl_ciphers": args.ssl_ciphers,
        "h11_max_incomplete_event_size": args.h11_max_incomplete_event_size,
        "h11_max_header_count": args.h11_max_header_count,
        **kwargs,
    }


def _server(app: ASGIApp, kwargs: dict[str, Any]) -> uvicorn.Server:
    """A uvicorn server configured as vLLM's `serve_http` configures one (its header limits
    and defaults), with no lifespan (vLLM's runs when the gate opens) and no signal handlers
    (the lifecycle owns them)."""
    from vllm.entrypoints.launchers.launcher import NoSignalServer
    from vllm.entrypoints.launchers.utils.constants import (
        H11_MAX_HEADER_COUNT_DEFAULT,
        H11_MAX_INCOMPLETE_EVENT_SIZE_DEFAULT,
    )

    kwargs = dict(kwargs)
    event_size = kwargs.pop("h11_max_incomplete_event_size", None)
    header_count = kwargs.pop("h11_max_header_count", None)
    config = uvicorn.Config(app, lifespan="off", **kwargs)
    config.h11_max_incomplete_event_size = event_size or H11_MAX_INCOMPLETE_EVENT_SIZE_DEFAULT
    # Read by vLLM's patched h11 protocol; uvicorn's Config does not declare it.
    config.h11_max_header_count = (  # type: ignore[attr-defined]
        header_count or H11_MAX_HEADER_COUNT_DEFAULT
    )
    config.load()
    server: uvicorn.Server = NoSignalServer(config)
    return server


def _loopback() -> socket.socket:
    """A socket on this host's loopback, any free port (IPv4, else IPv6)."""
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        except OSError:
            continue
        try:
            sock.bind((host, 0))
        except OSError:
            sock.close()
            continue
        return sock
    raise PortInUse(
        "no loopback address to listen on", problems=[("loopback", "the warm-up needs one")]
    )


# True in the task that serves a request of the private listener: uvicorn writes the access
# log line from that task, and its access log is one logger for every server (its
# `access_log=False` would silence the public listener's too), so a filter drops these.
_PRIVATE: ContextVar[bool] = ContextVar("llmwarm_private_listener", default=False)


class _QuietPrivate(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _PRIVATE.get()


class _WarmupOnly:
    """The private listener's app: a request with the warm-up token goes to the gate; any
    other is refused (403)."""

    def __init__(self, gate: Any) -> None:
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        _PRIVATE.set(True)
        if not self.gate.is_warmup(scope):
            await send({"type": "http.response.start", "status": 403, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.gate(scope, receive, send)


class VllmStop:
    """Stands in for the uvicorn server in vLLM's app state (`app.state.server`): vLLM's error
    handler sets `should_exit` when a request finds the engine dead. That is a request to the
    lifecycle, which then stops the HTTP server itself, in order (engine death: exit 5),
    rather than the HTTP server stopping under it."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()

    @property
    def should_exit(self) -> bool:
        return self.asked.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self.asked.set()


class Frontend:
    """The gate served on vLLM's port (as vLLM would serve its app) and on a private loopback
    listener for the warm-up, from `start()` until `stop()`."""

    def __init__(self, gate: Any, args: Namespace) -> None:
        self.listen_url, self.sock = bind(args)
        self.kwargs = serve_http_kwargs(args)
        public = {k: v for k, v in self.kwargs.items() if k != "enable_ssl_refresh"}
        self.public = _server(gate, public)
        self.private_sock = _loopback()
        # log_config None: uvicorn's logging is the public listener's (it is global)
        self.private = _server(_WarmupOnly(gate), {"log_config": None})
        self.vllm_stop = VllmStop()
        self.task: asyncio.Task[None] | None = None
        self._private_task: asyncio.Task[None] | None = None
        self._refresher: Any = None
        self._quiet = _QuietPrivate()

    @property
    def warmup_url(self) -> str:
        host, port = self.private_sock.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        """Serve from now on (503 until the gate opens)."""
        logging.getLogger("uvicorn.access").addFilter(self._quiet)
        self.task = asyncio.create_task(self.public.serve(sockets=[self.sock]))
        self._private_task = asyncio.create_task(self.private.serve(sockets=[self.private_sock]))
        if self.kwargs["enable_ssl_refresh"] and self.public.config.ssl is not None:
            from vllm.entrypoints.launchers.utils.ssl import SSLCertRefresher

            config = self.public.config
            self._refresher = SSLCertRefresher(
                ssl_context=config.ssl, key_path=config.ssl_keyfile,
                cert_path=config.ssl_certfile, ca_path=config.ssl_ca_certs,
            )  # fmt: skip

    async def stop(self, grace: int = 0) -> None:
        """Stop serving, giving in-flight requests `grace` seconds, then cancelling them.

        Always before the engine stops: a request handler must never outlive the engine.
        """
        if self._refresher is not None:
            self._refresher.stop()
            self._refresher = None
        for server, task in ((self.private, self._private_task), (self.public, self.task)):
            if task is not None:
                await _stop(server, task, grace)

    def close(self) -> None:
        logging.getLogger("uvicorn.access").removeFilter(self._quiet)
        self.sock.close()
        self.private_sock.close()


async def _stop(http: uvicorn.Server, task: asyncio.Task[None], grace: int) -> None:
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


async def vllm_app(llm: Any, args: Namespace, tasks: Any, stop: VllmStop) -> ASGIApp:
    """vLLM's OpenAI-compatible app with its state, exactly as `vllm serve` builds it."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    app = build_app(args, tasks, llm.model_config)
    await init_app_state(llm, app.state, args, tasks)
    app.state.server = stop  # vLLM's error handler asks it to stop (see `VllmStop`)
    return cast("ASGIApp", app)


@asynccontextmanager
async def vllm_lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """vLLM's app lifespan (stats logging, GC freeze, clean-up), run when the app goes live."""
    fastapi_app = cast("FastAPI", app)
    async with fastapi_app.router.lifespan_context(fastapi_app):
        yield
