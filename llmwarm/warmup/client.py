"""The warm-up's HTTP client, in a process of its own.

The warm-up times each request as a client sees it (`llmwarm.warmup.measure`). Run on the event loop
that serves (vLLM's API server and llmwarm's gate share it), the client's own work (parsing
128 streams' events, timing them) queued behind the server's and the server's behind it: at
128 streams its report read TTFT 1.07x and TPOT 1.08x of what vLLM's own benchmark, in a
process of its own, measured on the same engine (`benchmarks/measurement.py`). So the
client runs where a real client runs: in another process, with its own loop and its own
interpreter lock.

`ClientProcess` is started once per llmwarm process (`start`, beside the engine's start: its
half-second spawn is not on the warm-up's clock), asked for one batch at a time
(`measure_all`: the batch's requests over a pipe, their samples back), and stopped at the
end (`close`). A request that fails there comes back as the same `WarmupError`. A spawned
child of an armed llmwarm ends with it (`llmwarm.lifeline`). It never imports vLLM.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from llmwarm import lifeline
from llmwarm.errors import WarmupError

if TYPE_CHECKING:
    from llmwarm.model.corpus import WarmRequest
    from llmwarm.model.report import Sample

logger = logging.getLogger(__name__)


class Client(Protocol):
    """What the warm-up asks of its client (`ClientProcess`; the tests' `LocalClient`)."""

    async def measure_all(self, requests: Sequence[WarmRequest]) -> list[Sample]: ...
    async def get_json(self, path: str) -> Any: ...


def _child(conn: Connection, base_url: str, headers: dict[str, str]) -> None:
    """The client process: answer each (kind, payload) message until None."""
    lifeline.watch_parent()  # gone with llmwarm, even a SIGKILLed one
    try:
        import uvloop

        uvloop.run(_serve(conn, base_url, headers))
    except ImportError:  # pragma: no cover - vLLM depends on uvloop
        asyncio.run(_serve(conn, base_url, headers))


async def _serve(conn: Connection, base_url: str, headers: dict[str, str]) -> None:
    from llmwarm.warmup import measure

    loop = asyncio.get_running_loop()
    async with measure.session(base_url, headers) as session:
        while True:
            message = await loop.run_in_executor(None, conn.recv)
            if message is None:
                return
            kind, payload = message
            try:
                if kind == "batch":
                    answer: Any = await measure.measure_all(session, payload)
                else:  # "get"
                    async with session.get(payload, raise_for_status=True) as response:
                        answer = await response.json()
            except WarmupError as exc:
                conn.send(("failed", (exc.message, exc.problems)))
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                conn.send(("failed", (f"{kind} {payload!r:.80}", [("client", repr(exc))])))
            else:
                conn.send(("ok", answer))


class ClientProcess:
    """The warm-up's client, in a process of its own (see the module docstring)."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        self.base_url, self.headers = base_url, headers
        self._process: Any = None
        self._conn: Connection | None = None
        self._lock = asyncio.Lock()

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        self._process = context.Process(
            target=_child, args=(theirs, self.base_url, self.headers), name="llmwarm-client",
            daemon=True,
        )  # fmt: skip
        self._process.start()
        theirs.close()

    async def measure_all(self, requests: Sequence[WarmRequest]) -> list[Sample]:
        """Send these requests at once, from the client process; their samples."""
        samples: list[Sample] = await self._call("batch", list(requests))
        return samples

    async def get_json(self, path: str) -> Any:
        return await self._call("get", path)

    async def _call(self, kind: str, payload: Any) -> Any:
        if self._conn is None:
            self.start()
        conn = self._conn
        assert conn is not None
        async with self._lock:  # one batch at a time: the pipe is request, answer
            try:
                # pickling a wide batch of long prompts is milliseconds: off the loop
                await asyncio.to_thread(conn.send, (kind, payload))
                status, answer = await asyncio.to_thread(conn.recv)
            except asyncio.CancelledError:
                self.close()  # its batch goes on there otherwise, beside what comes next
                raise
            except (EOFError, OSError) as exc:
                self.close()
                raise WarmupError(
                    "the warm-up client ended", problems=[("client", repr(exc))]
                ) from None
        if status == "failed":
            message, problems = answer
            raise WarmupError(message, problems=problems)
        return answer

    def close(self) -> None:
        """Stop the process (at once: nothing it does needs finishing)."""
        conn, process, self._conn, self._process = self._conn, self._process, None, None
        if process is not None and process.is_alive():
            process.kill()
        if process is not None:
            process.join(5)
        if conn is not None:
            conn.close()
