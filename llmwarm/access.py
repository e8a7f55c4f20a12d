"""Who may do what: the peer checks the gate and the control endpoints make.

    user API         /v1/*, vLLM's own endpoints      vLLM's --api-key (or VLLM_API_KEY)
    read-only        GET /warmup/report, /coverage    the same API key
    admin            POST /warmup/run                 --admin-key (LLMWARM_ADMIN_KEY) as a
                                                      bearer token, from anywhere; without
                                                      one: loopback or unix-socket clients
                                                      only (a sidecar, `kubectl exec`), and
                                                      none that came through a proxy
    warm-up          anything, while warming          llmwarm's per-process token, from this
                                                      machine

A proxy on the same host (a service mesh's sidecar, a local Envoy) makes every client look
local: a request that carries forwarding headers is never taken for a local admin, and with
such a proxy an admin key is the safe choice (the README says so).
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import Scope

# Headers a proxy adds for the client it forwards (Envoy, nginx, HAProxy, Istio, ...).
FORWARDED = (b"forwarded", b"x-forwarded-for", b"x-real-ip", b"x-envoy-external-address")


def is_loopback(scope: Scope) -> bool:
    """The peer is a process on this machine's loopback, or on a unix socket."""
    client = scope.get("client")
    if client is None:  # a unix socket: only local processes can connect
        return True
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


def is_local(scope: Scope) -> bool:
    """The peer is this machine: loopback, a unix socket, or the server's own address (when
    bound to one interface, the warm-up dials that address; no other host can send from it)."""
    client, server = scope.get("client"), scope.get("server")
    if client is not None and server is not None and client[0] == server[0]:
        return True
    return is_loopback(scope)


def forwarded(scope: Scope) -> bool:
    """The request came through a proxy that says for whom."""
    return any(name in FORWARDED for name, _ in scope.get("headers", []))


def bearer(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


class Admin:
    """The admin check of `POST /warmup/run`: `None` when the request may, else the HTTP status
    and why not."""

    def __init__(self, key: str | None) -> None:
        self.key = key.encode() if key else None

    def refuses(self, scope: Scope) -> tuple[int, str] | None:
        if self.key is not None:
            token = bearer(scope)
            if token is None or not hmac.compare_digest(token, self.key):
                return 401, "needs the admin key (--admin-key) as a bearer token"
            return None
        if is_loopback(scope) and not forwarded(scope):
            return None
        return 403, "only from this host's loopback or unix socket without an --admin-key"
