"""Who may do what: the peer checks the gate and the control endpoints make.

    user API         vLLM's app, but its probes and docs  vLLM's --api-key (or VLLM_API_KEY)
    read-only        GET /warmup/report, /coverage        the same API key
    admin            POST /warmup/run                     --admin-key (LLMWARM_ADMIN_KEY) as a
                                                          bearer token, from anywhere; without
                                                          one, only over a Unix socket (vLLM's
                                                          --uds), never over TCP
    warm-up          anything, while warming              llmwarm's per-process token, from
                                                          this machine, never relayed

Why a Unix socket and not loopback: whatever relays a request to the port makes its client look
local, and some relays add no header that says so (`kubectl port-forward`, `ssh -L`, a tunnel;
an Istio sidecar connects from 127.0.0.6 with `x-forwarded-proto` and
`x-forwarded-client-cert` only). None of them reaches a Unix socket, and only local processes
with the file's permissions can.

Cross-site requests and DNS rebinding (`llmwarm.serve.control`): a control request whose `Origin` is
not the server it asks is refused; a re-warm must say `Content-Type: application/json` (a web
page's form or `text/plain` POST cannot); a server with no API key answers its control
endpoints only to a `Host` that is an address, `localhost` or this machine's name.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import Scope

# Headers a proxy adds for the client it forwards (Envoy, nginx, HAProxy, Istio, CDNs), by
# name or prefix.
FORWARDED = (
    b"forwarded", b"x-forwarded-", b"x-real-ip", b"x-envoy-", b"x-client-ip",
    b"true-client-ip", b"cf-connecting-ip", b"via",
)  # fmt: skip


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as a peer or Host gives it; an IPv4-mapped IPv6 one (`::ffff:127.0.0.1`, a
    dual-stack `--host ::`) as the IPv4 address it is (Python 3.11 calls it no loopback)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback(scope: Scope) -> bool:
    """The peer is a process on this machine's loopback, or on a unix socket."""
    client = scope.get("client")
    if client is None:  # a unix socket: only local processes can connect
        return True
    address = _address(client[0])
    return address is not None and address.is_loopback


def is_local(scope: Scope) -> bool:
    """The peer is this machine, and nothing relayed the request: loopback, a unix socket, or
    the server's own address (bound to one interface, the warm-up dials that address; no other
    host can send from it). A forwarding header says a proxy relayed it (with uvicorn trusting
    any proxy, `X-Forwarded-For: 127.0.0.1` would otherwise make anyone local)."""
    if forwarded(scope):
        return False
    client, server = scope.get("client"), scope.get("server")
    if client is not None and server is not None and client[0] == server[0]:
        return True
    return is_loopback(scope)


def forwarded(scope: Scope) -> bool:
    """The request came through a proxy that says so."""
    return any(name.startswith(FORWARDED) for name, _ in scope.get("headers", []))


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
        if scope.get("client") is None and not forwarded(scope):
            return None  # a Unix socket (--uds): no relay reaches it
        return 403, (
            "needs the admin key (--admin-key) as a bearer token; without one, re-warms are "
            "taken only over a Unix socket (--uds)"
        )


def _host(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"host":
            return str(value.decode("latin-1"))
    return ""


def _hostname(host: str) -> str:
    """`Host`'s name, without its port."""
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def cross_origin(scope: Scope) -> bool:
    """The request says it comes from a web page of another origin than the server it asks
    (`Origin`; `null`, a sandboxed page's, is never the server)."""
    for name, value in scope.get("headers", []):
        if name == b"origin":
            origin = str(value.decode("latin-1"))
            return origin.split("://", 1)[-1].rstrip("/").lower() != _host(scope).lower()
    return False


def machine_host(scope: Scope) -> bool:
    """`Host` names this machine as only it and its own network can: an address, `localhost`,
    or its host name (a DNS name a web page rebound to this address is none of these)."""
    name = _hostname(_host(scope)).lower()
    if _address(name) is not None or name == "localhost" or name.endswith(".localhost"):
        return True
    return name in {socket.gethostname().lower(), socket.getfqdn().lower()}
