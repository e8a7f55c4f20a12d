"""Side by side, in one run: plain vLLM's OpenAI server against `llmwarm serve`.

For each run, start each server in turn (alternating which goes first) on the same model and
flags, time it from launch to ready (`/health` 200 for vLLM, `/ready` 200 for llmwarm), then,
the moment it is ready, send each probe request kind once (first) and again `--repeats` times
(steady). Prints medians over the runs; `--json` keeps every number.

    python scripts/bench_cold_start.py --model .cache/tiny-llama --runs 3
"""

from __future__ import annotations

import argparse
import itertools
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

from llmwarm import features
from llmwarm.features import Features

ENGINE_FLAGS = ["--gpu-memory-utilization", "0.5", "--max-model-len", "1024"]

BASE: dict[str, tuple[str, dict[str, Any]]] = {
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
}  # fmt: skip
# Request features, with the very bodies llmwarm's warm-up sends for them.
FEATURES = ["sampling", "penalties", "logprobs", "prompt_logprobs", "n", "stop",
            "json_schema", "json_object", "regex", "choice"]  # fmt: skip
PROBES = {
    **BASE,
    **{
        f"chat+{name}": (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16,
             **features.body(name, "chat", Features())},
        )
        for name in FEATURES
    },
}  # fmt: skip
NONCE = itertools.count()


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
    payload: dict[str, Any] = {"model": "m", "temperature": 0.0, **body}
    if "structured_outputs" not in body and "response_format" not in body:
        payload["ignore_eos"] = True
    # A fresh first word each time, so no request is served from the prefix cache.
    nonce = f"n{next(NONCE)} "
    if "prompt" in payload:
        payload["prompt"] = nonce + payload["prompt"]
    else:
        payload["messages"] = [
            {"role": "user", "content": nonce + payload["messages"][0]["content"]}
        ]
    start = time.perf_counter()
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
    """Medians over the runs: time to ready, and first/steady latency per request kind."""
    servers = ("vllm", "llmwarm")
    runs = {server: [r for r in results if r["server"] == server] for server in servers}
    table = Table(title="first request vs steady (median of repeats), the moment it was ready")
    table.add_column("request kind")
    for server in servers:
        table.add_column(f"{server}\nfirst ms", justify="right")
        table.add_column(f"{server}\nfirst/steady", justify="right")
    ratios: dict[str, list[float]] = {server: [] for server in servers}
    for name in PROBES:
        cells = [name]
        for server in servers:
            first = statistics.median(r["kinds"][name]["first_s"] for r in runs[server])
            ratio = statistics.median(
                r["kinds"][name]["first_s"] / r["kinds"][name]["steady_s"] for r in runs[server]
            )
            ratios[server].append(ratio)
            cells += [f"{first * 1000:.0f}", f"{ratio:.2f}x"]
        table.add_row(*cells)
    table.add_section()
    for label, fn in (("worst", max), ("geomean", statistics.geometric_mean)):
        cells = [label]
        for server in servers:
            cells += ["", f"{fn(ratios[server]):.2f}x"]
        table.add_row(*cells)
    table.add_row(
        "time to ready s",
        *(c for server in servers
          for c in (f"{statistics.median(r['ready_s'] for r in runs[server]):.1f}", "")),
    )  # fmt: skip
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
