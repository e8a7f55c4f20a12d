from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
LLMWARM = [sys.executable, "-m", "llmwarm"]
# vLLM on this CPU machine: a small KV cache and memory fraction (NUMA node 0 is ~8 GiB).
ENGINE_FLAGS = ["--gpu-memory-utilization", "0.5", "--max-model-len", "1024"]


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The deterministic tiny Llama of scripts/make_tiny_model.py, built once (seconds)."""
    out = ROOT / ".cache" / "tiny-llama"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(out)], check=True
    )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


STARTUP_TIMEOUT_S = 400


def wait_ready(proc: subprocess.Popen[bytes], client: httpx.Client, log: Path) -> None:
    """Poll /ready until 200; fail with the log's tail if the process exits or never gets there."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            if client.get("/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass  # not bound yet (the CLI is still importing vLLM)
        time.sleep(0.2)
    pytest.fail(
        f"not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text(errors='replace')[-3000:]}"
    )
