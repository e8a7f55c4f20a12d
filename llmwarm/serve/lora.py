"""LoRA adapters loaded at run time, warm before they serve a user.

With `VLLM_ALLOW_RUNTIME_LORA_UPDATING`, vLLM loads an adapter on `POST /v1/load_lora_adapter`
(or SageMaker's `POST /adapters`) and serves it at once: its first requests run its cold
paths. `AdapterRoutes`, the ASGI middleware between the gate and the recording, holds each
such adapter back until it is warm:

  * a new adapter is *warming* (`RunState.adapters`) from the moment its load reaches vLLM:
    a request naming it (its body's `model`) gets 503 + Retry-After, while the base model and
    every other adapter serve on (vLLM routes to an adapter once loaded, before its answer);
    a load vLLM refuses lets it go again;
  * its warm-up (`fit.for_adapter`: the serving profile's feature buckets, the `lora` feature
    on this adapter) runs with the gate open, one warm-up at a time with the re-warms
    (`llmwarm.serve.rewarm`, their one owner);
  * then it is *warm*: its requests pass, the report lists it (loaded, warm after how long),
    and coverage counts its kinds as warm. A warm-up that fails leaves it served (a log line
    and `llmwarm_warmups_total{trigger="adapter", outcome="failed"}` say so): an adapter held
    back for good is worse than a cold one.

Why 503s, not a load call held until warm: vLLM lists the adapter (`/v1/models`) and routes to
it from the moment it has loaded it, before its answer; a router that learns adapters from the
listing (llm-d's, AIBrix's) may send requests before a held answer. Only the requests
themselves can be held back, and a held load call would also trip its caller's timeout (a
warm-up takes seconds to minutes).

Unloaded while warming: its warm-up is cancelled before vLLM unloads it (no warm-up request
meets a vanished adapter). Loaded again: vLLM refuses an adapter already loaded (nothing
changes here), or with `load_inplace` reloads its weights (warmed again). A load vLLM refuses
changes nothing. Stopping: the warm-ups are cancelled with the re-warms; the adapter's
requests are refused while the server drains.

Bodies are read here only while an adapter is warming, and only a model endpoint's: otherwise
each request passes untouched. Such a body is read for its `model` as the recording reads it,
a slice at a time with the loop's other work between two.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Protocol

from llmwarm.model.endpoints import BY_PATH
from llmwarm.serve.recording import INVOCATIONS, read
from llmwarm.traffic.skeleton import Skeleton

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from llmwarm.serve.state import RunState

logger = logging.getLogger(__name__)

LOAD = {"/v1/load_lora_adapter": "lora_name", "/adapters": "name"}  # POST: the name's field
UNLOAD = {"/v1/unload_lora_adapter": "lora_name"}  # POST; and SageMaker's DELETE /adapters/NAME
RETRY_AFTER_S = 5


class Owner(Protocol):
    """What starts and stops adapter warm-ups (`llmwarm.serve.rewarm.Rewarms`)."""

    def adapter_loading(self, name: str) -> object | None: ...

    def adapter_refused(self, name: str, held: object) -> None: ...

    def adapter_loaded(self, name: str) -> None: ...

    async def adapter_unloading(self, name: str) -> None: ...


class AdapterRoutes:
    """Between the gate and the recording (`app`): adapters' loads and unloads seen, and
    requests naming a warming adapter refused (see the module docstring)."""

    def __init__(self, state: RunState, app: ASGIApp, owner: Owner | None = None) -> None:
        self.state = state
        self.app = app
        self.owner = owner  # set by the lifecycle once re-warms exist

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.owner is None:
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        if method == "POST" and (path in LOAD or path in UNLOAD):
            return await self._managed(scope, receive, send)
        if method == "DELETE" and path.startswith("/adapters/"):
            name = path.removeprefix("/adapters/")
            await self.owner.adapter_unloading(name)
            return await self.app(scope, receive, send)
        if method == "POST" and (path in BY_PATH or path == INVOCATIONS) and self._warming():
            body = await _read(receive)
            model = await _model(body)
            adapter = self.state.adapters.get(model) if model else None
            if adapter is not None and adapter.warming:
                return await _refuse(send, model or "")
            return await self.app(scope, _replay(body, receive), send)
        return await self.app(scope, receive, send)

    def _warming(self) -> bool:
        return any(a.warming for a in self.state.adapters.values())

    async def _managed(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A load or an unload: vLLM's own answer, the owner told what it did."""
        assert self.owner is not None
        path = scope["path"]
        body = await _read(receive)
        name = _field(body, LOAD.get(path) or UNLOAD[path])
        if path in UNLOAD and name:
            await self.owner.adapter_unloading(name)  # before vLLM unloads it
        status = 0

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        held = self.owner.adapter_loading(name) if path in LOAD and name else None
        try:
            await self.app(scope, _replay(body, receive), watched)
        finally:
            if path in LOAD and name and status == 200:
                self.owner.adapter_loaded(name)
            elif held is not None:
                self.owner.adapter_refused(name or "", held)


async def _read(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # a disconnect: the app finds it on its own receive
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body read, then what the client sends next (a disconnect)."""
    given = False

    async def replayed() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _model(body: bytes) -> str | None:
    """A model request's `model` (its long strings, a prompt, an image, left unread; read a
    slice at a time, as the recording reads it)."""
    skeleton = Skeleton()
    await read(skeleton, body)
    data = skeleton.parse()
    value = data.get("model") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def _field(body: bytes, name: str) -> str | None:
    try:
        data: Any = json.loads(body)
    except ValueError:
        return None
    value = data.get(name) if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


async def _refuse(send: Send, adapter: str) -> None:
    payload = json.dumps(
        {
            "status": "warming",
            "adapter": adapter,
            "message": f"llmwarm: the LoRA adapter {adapter!r} is loaded and warming; "
            "retry later (the base model and other adapters serve)",
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"retry-after", str(RETRY_AFTER_S).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
