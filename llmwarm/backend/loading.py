"""What a loading engine is doing, told by vLLM's own worker: for `/startup`'s detail.

vLLM logs each stage of its worker's start (the weights, torch.compile, the KV cache, CUDA
graphs) in the worker's process, which vLLM spawns. The worker runs llmwarm's code through
`--worker-extension-cls` (`llmwarm.backend.jitmon`); importing it there installs `_Forward`, a log
handler that sends each stage's index in `STAGES` to the llmwarm process over a Unix datagram
socket (`listening`: its path reaches the worker in the environment a spawned process
inherits). Without llmwarm's extension (a user's own `--worker-extension-cls`) or on a vLLM
whose messages changed, the detail stays "the engine starts": nothing else depends on it.

The messages are vLLM 0.32's format strings, GPU and CPU runners both; tests check that each is
still in the installed vLLM's source.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

ENV = "LLMWARM_LOADING_SOCKET"

# (a substring of vLLM's log message, the stage it begins): in the order a GPU start runs them.
STAGES: tuple[tuple[str, str], ...] = (
    ("Starting to load model", "loading the weights"),
    # GPU: the memory-profiling run compiles the model (torch.compile) first
    ("Loading weights took", "compiling the model and profiling its memory"),
    ("Directly load the compiled graph", "loading the compiled model from the cache"),
    ("Warming up model for the compilation", "compiling the model"),  # CPU
    ("Available KV cache memory", "allocating the KV cache"),
    ("Explicitly set (", "allocating the KV cache"),  # CPU: "... GiB for KV cache on node"
    ("Compile and warming up model for size", "warming each graph size, capturing CUDA graphs"),
    ("Graph capturing finished", "the engine finishes its start"),
)


def stage_of(message: str) -> int | None:
    """The index of the stage a vLLM log message begins, if it begins one."""
    for index, (marker, _) in enumerate(STAGES):
        if marker in message:
            return index
    return None


class _Forward(logging.Handler):
    """In vLLM's worker: each stage's index, as one datagram (lost ones are only a detail)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def emit(self, record: logging.LogRecord) -> None:
        index = stage_of(str(record.msg))
        if index is not None:
            with contextlib.suppress(OSError):
                self.sock.sendto(bytes([index]), self.path)


def in_worker() -> None:
    """Forward vLLM's stages, when a llmwarm process listens and this is another process (its
    engine's worker); once per process."""
    listener = os.environ.get(ENV, "")
    pid, _, path = listener.partition(":")
    if not path or pid == str(os.getpid()):
        return
    log = logging.getLogger("vllm")
    if not any(isinstance(h, _Forward) for h in log.handlers):
        log.addHandler(_Forward(path))


@contextlib.contextmanager
def listening(on_stage: Callable[[str], None]) -> Iterator[None]:
    """While the engine starts: receive its worker's stages (call from the event loop's
    thread, before vLLM spawns its processes; they inherit the socket's path)."""
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory(prefix="llmwarm-") as directory:
        path = str(Path(directory) / "loading.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(path)  # (a TMPDIR too long for a socket's path: no detail, no harm)
        except OSError as exc:
            logger.debug("no loading stages: cannot bind %s: %s", path, exc)
            sock.close()
            yield
            return
        sock.setblocking(False)

        def received() -> None:
            with contextlib.suppress(OSError):
                while True:  # until the socket would block
                    data = sock.recv(16)
                    if data and data[0] < len(STAGES):
                        on_stage(STAGES[data[0]][1])

        loop.add_reader(sock.fileno(), received)
        before = os.environ.get(ENV)
        os.environ[ENV] = f"{os.getpid()}:{path}"
        try:
            yield
        finally:
            loop.remove_reader(sock.fileno())
            sock.close()
            if before is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = before
