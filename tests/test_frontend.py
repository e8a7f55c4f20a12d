"""The HTTP half of the vLLM adapter: llmwarm's server start-up against vLLM's own.

vLLM's `serve_http` cannot take the gate in front of its app (it installs its own signal
handlers and stops the engine before the HTTP server), so `llmwarm.backend.frontend` builds the
server from vLLM's pieces. These tests fail the day vLLM's start-up passes an argument llmwarm's
does not, or `serve_http` consumes one llmwarm does not handle.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llmwarm.backend import frontend
from llmwarm.backend.vllm_args import parse_args
from tests.fakes import INNER


@pytest.fixture(scope="module")
def vllm_args() -> Callable[..., Any]:
    def parse(*flags: str) -> Any:
        return parse_args(["fake/model", *flags], "test")

    return parse


def _keywords_passed(function: Callable[..., Any], callee: str) -> set[str]:
    """The keyword names `function`'s source passes to `callee`, and the keys it adds to a
    `**kwargs` dict it passes on (`uvicorn_kwargs["log_config"] = ...`)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == callee:
            names |= {k.arg for k in node.keywords if k.arg is not None}
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
            if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                names.add(node.slice.value)
    return names


def test_every_argument_vllms_start_up_passes_is_passed_on(
    vllm_args: Callable[..., Any], tmp_path: Path
) -> None:
    from vllm.entrypoints.launchers.api_server.entry import build_and_serve

    vllms = _keywords_passed(build_and_serve, "serve_http")
    # `sock` is the socket llmwarm binds itself; `peer_loads` is for several API servers,
    # which llmwarm refuses (--api-server-count)
    log_config = tmp_path / "log.json"
    log_config.write_text('{"version": 1, "disable_existing_loggers": false}')
    ours = set(frontend.serve_http_kwargs(vllm_args("--log-config-file", str(log_config))))
    assert vllms - {"sock", "peer_loads"} <= ours, vllms - ours
    assert "log_config" in ours  # vLLM's get_uvicorn_log_config, when it gives one


def test_what_serve_http_consumes_itself_is_handled() -> None:
    from vllm.entrypoints.launchers.launcher import serve_http

    params = set(inspect.signature(serve_http).parameters)
    assert params == {"app", "sock", "enable_ssl_refresh", "peer_loads", "uvicorn_kwargs"}
    popped = set()
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(serve_http)))):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "pop"
                and isinstance(node.args[0], ast.Constant)):  # fmt: skip
            popped.add(node.args[0].value)
    # `_server` applies these to uvicorn's config as `serve_http` does
    assert popped == {"h11_max_incomplete_event_size", "h11_max_header_count"}


def test_the_public_server_gets_vllms_tls_and_header_limits(vllm_args: Callable[..., Any]) -> None:
    args = vllm_args(
        "--ssl-ciphers", "ECDHE+AESGCM", "--ssl-cert-reqs", "2", "--enable-ssl-refresh",
        "--h11-max-header-count", "77", "--disable-uvicorn-access-log",
    )  # fmt: skip
    kwargs = frontend.serve_http_kwargs(args)
    assert kwargs["enable_ssl_refresh"] is True
    assert (kwargs["ssl_cert_reqs"], kwargs["ssl_ciphers"]) == (2, "ECDHE+AESGCM")
    assert kwargs["access_log"] is False
    public = {k: v for k, v in kwargs.items() if k != "enable_ssl_refresh"}
    server = frontend._server(INNER, public)
    assert server.config.h11_max_header_count == 77  # type: ignore[attr-defined]
    assert server.config.lifespan == "off"


def test_the_url_it_logs_names_the_port_it_bound_when_asked_for_any(
    vllm_args: Callable[..., Any],
) -> None:
    # `warm` and the tests bind port 0; vLLM's setup_server builds its URL from the flag
    url, sock = frontend.bind(vllm_args("--host", "127.0.0.1", "--port", "0"))
    try:
        assert url == f"http://127.0.0.1:{sock.getsockname()[1]}"
        assert not url.endswith(":0")
    finally:
        sock.close()
