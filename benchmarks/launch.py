"""Launching llmwarm or plain vLLM on this machine, for the benchmarks and the e2e tests
(tests/launch.py builds on it): the checkout, the engine's flags and environment here, a free
port, a server launched, and waiting until it is ready."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
LLMWARM = [sys.executable, "-m", "llmwarm"]
# vLLM on this CPU machine: a small KV cache and memory fraction (NUMA node 0 is ~8 GiB).
ENGINE_FLAGS = ["--gpu-memory-utilization", "0.5", "--max-model-len", "1024"]


def engine_env(**more: str) -> dict[str, str]:
    """This process's environment for an engine here: 1 GiB of KV cache unless set (vLLM's CPU
    backend takes it from `VLLM_CPU_KVCACHE_SPACE`), and `more`."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env | more


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def launched(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`cmd` running, its output appended to `log`; SIGTERM on exit (SIGKILL after 60 s)."""
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_ready(proc: subprocess.Popen[bytes], url: str, ready_path: str, log: Path) -> None:
    """Until `ready_path` answers 200 (SystemExit if the process exits first)."""
    with httpx.Client(base_url=url, timeout=30) as client:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args!r:.80} exited with {proc.returncode}; see {log}")
            try:
                if client.get(ready_path).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)


@contextlib.contextmanager
def ready_server(
    cmd: list[str], url: str, ready_path: str, env: dict[str, str], log: Path
) -> Iterator[float]:
    """Launch `cmd`, wait until `ready_path` answers 200; the seconds that took. SIGTERM on exit."""
    start = time.perf_counter()
    with launched(cmd, env, log) as proc:
        wait_ready(proc, url, ready_path, log)
        yield time.perf_counter() - start
