from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

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
