"""How fast the probes answer while the engine is saturated: llmwarm's `/ready` and `/live`
against plain vLLM's `/health`, side by side.

Starts `llmwarm serve MODEL` and plain vLLM on the same model and flags, one after the other.
On each: a probe every 100 ms (a client warmed first, as a kubelet's is), timed, for
`--seconds` while the server idles, then while `vllm.benchmarks.serve` (a process of its own)
keeps `--streams` requests in flight, well past `--max-num-seqs` (long prompts, long outputs),
and, for llmwarm, during an open-gate `POST /warmup/run` under that same load. Writes the
`probes` section of docs/reliability.md.

    python -m benchmarks.probes
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from benchmarks.launch import ENGINE_FLAGS, ROOT, engine_env, free_port, ready_server
from benchmarks.pages import write_section
from benchmarks.serving import BENCH

FLAGS = [*ENGINE_FLAGS, "--served-model-name", "bench"]


def probe_loop(url: str, paths: list[str], stop: threading.Event) -> dict[str, list[float]]:
    """Every 100 ms, each path once; their latencies, in seconds (a failure: infinity)."""
    seen: dict[str, list[float]] = {path: [] for path in paths}
    with httpx.Client(base_url=url, timeout=5) as client:
        client.get("/live")  # the client's first request is its own cost, not the server's
        while not stop.is_set():
            for path in paths:
                start = time.perf_counter()
                try:
                    client.get(path)
                    seen[path].append(time.perf_counter() - start)
                except httpx.HTTPError:
                    seen[path].append(float("inf"))
            stop.wait(0.1)
    return seen


def saturate(model: str, port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-c", BENCH, "--backend", "vllm", "--base-url",
           f"http://127.0.0.1:{port}", "--model", "bench", "--tokenizer", model,
           "--dataset-name", "random", "--random-input-len", "512", "--random-output-len",
           "128", "--num-prompts", str(args.streams * 20), "--max-concurrency",
           str(args.streams), "--ignore-eos", "--seed", "3"]  # fmt: skip
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env())


def _env() -> dict[str, str]:
    return engine_env()


def measure(kind: str, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    flags = [*FLAGS, "--max-num-seqs", str(args.max_num_seqs), "--port", str(port)]
    if kind == "vllm":
        cmd, paths = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                      args.model, *flags], ["/health"]  # fmt: skip
    else:
        cmd, paths = [sys.executable, "-m", "llmwarm", "serve", args.model, *flags, "--report",
                      os.devnull, "--rewarm-min-interval", "0"], ["/ready", "/live"]  # fmt: skip
    phases: dict[str, dict[str, list[float]]] = {}
    with ready_server(cmd, url, paths[0], _env(), args.log):

        def during(name: str, work: Any) -> None:
            stop = threading.Event()
            result: dict[str, dict[str, list[float]]] = {}
            prober = threading.Thread(
                target=lambda: result.update(seen=probe_loop(url, paths, stop))
            )
            prober.start()
            work()
            stop.set()
            prober.join()
            phases[name] = result["seen"]
            print(kind, name, {p: _stats(v) for p, v in result["seen"].items()}, flush=True)

        during("idle", lambda: time.sleep(args.seconds))
        load = saturate(args.model, port, args, args.log)
        time.sleep(5)  # the load's own start-up
        during("saturated", lambda: time.sleep(args.seconds))
        if kind == "llmwarm":
            during("saturated, re-warming", lambda: httpx.post(
                f"{url}/warmup/run", json={"profile": "minimal"}, timeout=600))  # fmt: skip
        load.terminate()
        load.wait(60)
    return phases


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "max_ms": 1000 * ordered[-1],
    }


def markdown(
    results: dict[str, dict[str, dict[str, list[float]]]], args: argparse.Namespace
) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Probes under a saturated engine (`benchmarks/probes.py`)", "",
        f"Measured {when} on this machine (2 cores, shared, vLLM CPU, the tiny model): "
        f"`python -m benchmarks.probes --seconds {args.seconds:g} --streams {args.streams} "
        f"--max-num-seqs {args.max_num_seqs}`. A probe every 100 ms from a warmed client; "
        f"saturated: vLLM's own benchmark keeps {args.streams} requests in flight (512 tokens "
        f"in, 128 out) against `--max-num-seqs {args.max_num_seqs}`. Latency p50 / p99 / max, "
        "ms (n probes).", "",
        "| server, probe | idle | saturated | saturated, during a re-warm |",
        "|---|---|---|---|",
    ]  # fmt: skip

    def cell(values: list[float] | None) -> str:
        if not values:
            return "-"
        s = _stats(values)
        return f"{s['p50_ms']:.1f} / {s['p99_ms']:.1f} / {s['max_ms']:.1f} ({s['n']})"

    for kind, phases in results.items():
        for path in next(iter(phases.values())):
            row = [cell(phases.get(name, {}).get(path))
                   for name in ("idle", "saturated", "saturated, re-warming")]  # fmt: skip
            lines.append(f"| {kind} `{path}` | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / ".cache" / "tiny-llama"))
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--streams", type=int, default=96)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--log", type=Path, default=ROOT / ".cache" / "bench-probes.log")
    args = parser.parse_args()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    results = {kind: measure(kind, args) for kind in ("llmwarm", "vllm")}
    body = markdown(results, args)
    print(body)
    write_section(args.docs / "reliability.md", "probes", body)


if __name__ == "__main__":
    main()
