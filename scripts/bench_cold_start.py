"""Side by side, in one run: plain vLLM's OpenAI server against `llmwarm serve`.

For each run, start each server in turn (alternating which goes first) on the same model and
flags, time it from launch to ready (`/health` 200 for vLLM, `/ready` 200 for llmwarm), then,
the moment it is ready, send each probe request kind once (first) and again `--repeats` times
(steady). Prints medians over the runs; `--json` keeps every number.

    python scripts/bench_cold_start.py --model .cache/tiny-llama --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

ENGINE_FLAGS = ["--gpu-memory-utilization", "0.5", "--max-model-len", "1024"]

# name -> (path, body); every probe asks for a fixed output length.
PROBES: dict[str, tuple[str, dict[str, Any]]] = {
    "completion": ("/v1/completions", {"prompt": "the model serves", "max_tokens": 16}),
    "completion-stream": (
        "/v1/completions",
        {"prompt": "the model serves", "max_tokens": 16, "stream": True},
    ),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 16}),
    "chat-stream": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": 16, "stream": True}),
    "long-prompt": ("/v1/completions", {"prompt": "alpha beta gamma " * 150, "max_tokens": 16}),
    "logprobs": ("/v1/completions", {"prompt": "the model", "max_tokens": 16, "logprobs": 3}),
}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(server: str, model: str, port: int, extra: list[str]) -> tuple[list[str], str]:
    common = [*ENGINE_FLAGS, "--host", "127.0.0.1", "--port", str(port),
              "--served-model-name", "m", *extra]  # fmt: skip
    if server == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        return cmd + common, "/health"
    return [sys.executable, "-m", "llmwarm", "serve", model, *common], "/ready"


def probe(client: httpx.Client, path: str, body: dict[str, Any]) -> float:
    start = time.perf_counter()
    payload = {"model": "m", "ignore_eos": True, "temperature": 0.0, **body}
    with client.stream("POST", path, json=payload) as resp:
        resp.read()
        resp.raise_for_status()
    return time.perf_counter() - start


def one(server: str, model: str, repeats: int, extra: list[str], log: Path) -> dict[str, Any]:
    port = free_port()
    cmd, ready_path = command(server, model, port, extra)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    start = time.perf_counter()
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"{server} exited with {proc.returncode}; see {log}")
                try:
                    if client.get(ready_path).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            ready_s = time.perf_counter() - start
            kinds = {}
            for name, (path, body) in PROBES.items():
                first = probe(client, path, body)
                steady = statistics.median(probe(client, path, body) for _ in range(repeats))
                kinds[name] = {"first_s": first, "steady_s": steady}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"server": server, "ready_s": ready_s, "kinds": kinds}


def summarise(results: list[dict[str, Any]]) -> Table:
    table = Table(title="time to ready, and first vs steady latency the moment it was ready")
    table.add_column("server")
    table.add_column("ready s", justify="right")
    for name in PROBES:
        table.add_column(f"{name}\nfirst/steady", justify="right")
    table.add_column("worst", justify="right")
    table.add_column("geomean", justify="right")
    for server in ("vllm", "llmwarm"):
        runs = [r for r in results if r["server"] == server]
        ratios = {
            name: statistics.median(r["kinds"][name]["first_s"] / r["kinds"][name]["steady_s"]
                                    for r in runs)
            for name in PROBES
        }  # fmt: skip
        table.add_row(
            server,
            f"{statistics.median(r['ready_s'] for r in runs):.1f}",
            *(f"{ratios[n]:.2f}x" for n in PROBES),
            f"{max(ratios.values()):.2f}x",
            f"{statistics.geometric_mean(ratios.values()):.2f}x",
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="steady requests per kind")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--log", type=Path, default=Path(".cache/bench.log"))
    args, extra = parser.parse_known_args()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for run in range(args.runs):
        order = ["vllm", "llmwarm"] if run % 2 == 0 else ["llmwarm", "vllm"]
        for server in order:
            result = one(server, args.model, args.repeats, extra, args.log)
            print(f"run {run + 1} {server}: ready in {result['ready_s']:.1f} s", flush=True)
            results.append(result)
    Console(width=200).print(summarise(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
