"""Who may do what: the peer checks of `llmwarm.serve.access`."""

from __future__ import annotations

from typing import Any

import pytest

from llmwarm.serve.access import Admin, is_local, is_loopback, machine_host


def _scope(client: tuple[str, int] | None, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http", "client": client, "server": ("10.0.0.5", 8000), "headers": headers}


def test_a_forwarded_for_header_never_makes_a_client_local() -> None:
    # The defect: with FORWARDED_ALLOW_IPS=* uvicorn takes the client from X-Forwarded-For,
    # and `X-Forwarded-For: 127.0.0.1` made anyone local.
    rewritten = _scope(("127.0.0.1", 0), (b"x-forwarded-for", b"127.0.0.1"))
    assert not is_local(rewritten)
    assert is_local(_scope(("127.0.0.1", 40000)))


@pytest.mark.parametrize("peer", ["::ffff:127.0.0.1", "127.0.0.1", "::1", "127.0.0.6"])
def test_loopback_in_any_form_is_loopback(peer: str) -> None:
    # The defect: `::ffff:127.0.0.1` (a dual-stack `--host ::`) is no loopback to Python 3.11
    assert is_loopback(_scope((peer, 40000)))


@pytest.mark.parametrize("peer", ["::ffff:10.0.0.9", "10.0.0.9", "not-an-address"])
def test_another_host_is_not_loopback(peer: str) -> None:
    assert not is_loopback(_scope((peer, 40000)))


def test_without_an_admin_key_only_a_unix_socket_asks_and_only_unrelayed() -> None:
    admin = Admin(None)
    assert admin.refuses(_scope(None)) is None
    assert admin.refuses(_scope(None, (b"x-forwarded-proto", b"https"))) is not None
    assert admin.refuses(_scope(("127.0.0.1", 40000))) is not None
    assert admin.refuses(_scope(("::ffff:127.0.0.1", 40000))) is not None


@pytest.mark.parametrize(
    ("host", "ours"),
    [("127.0.0.1:8000", True), ("[::1]:8000", True), ("localhost", True), ("10.2.3.4", True),
     ("evil.example", False), ("evil.example:8000", False), ("", False)],
)  # fmt: skip
def test_a_host_that_names_this_machine(host: str, ours: bool) -> None:
    assert machine_host(_scope(("1.2.3.4", 1), (b"host", host.encode()))) is ours
