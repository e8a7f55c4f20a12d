"""The warm-up on a quiet host against a noisy one, side by side in one run.

For each model (`--model NAME=PATH`, repeatable), each run does `llmwarm warm MODEL` with the
default profile twice, in alternating order: once on a quiet host, once with a CPU hog (a busy
loop, busy half of every 100 ms as a neighbour's bursts are) on every core but the first. Reads
the warm-up's seconds, requests, converged buckets and measured noise from each report.
Writes the `noise` section of docs/benchmarks.md.

    python -m benchmarks.noise --model tiny=.cache/tiny-llama --runs 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.launch import ENGINE_FLAGS, ROOT, engine_env
from benchmarks.pages import model_options, models, write_section

HOG = """
import time
while True:
    end = time.perf_counter() + 0.05
    while time.perf_counter() < end:
        pass
    time.sleep(0.05)
"""


@contextlib.contextmanager
def hog(on: bool) -> Iterator[None]:
    """A busy-half-the-time process on each core but the first, for as long as it lasts."""
    procs: list[subprocess.Popen[bytes]] = []
    if on:
        for core in sorted(os.sched_getaffinity(0))[1:] or [0]:
            procs.append(subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-c", HOG]))
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def warm(model: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = engine_env()
        with args.log.open("ab") as log:
            subprocess.run(
                [sys.executable, "-m", "llmwarm", "warm", model, *ENGINE_FLAGS,
                 "--report", str(report)],
                stdout=log, stderr=subprocess.STDOUT, env=env, check=False,
            )  # fmt: skip
        if not report.exists():
            raise SystemExit(f"llmwarm warm wrote no report; see {args.log}")
        data: dict[str, Any] = json.loads(report.read_text())
    buckets = data["buckets"]
    required = [b for b in buckets if not b["optional"]]
    noise = [b["noise"] for b in buckets if b.get("noise") is not None]
    # How fast the host runs a warm request: the geometric mean of the required buckets' last
    # round medians (end to end), to set the warm-up's own noisy/quiet ratio against.
    steady = [b["rounds"][-1]["e2e_median_s"] for b in required if b["rounds"]]
    return {
        "steady_s": statistics.geometric_mean(steady) if steady else None,
        "warmup_s": data["warmup_s"],
        "requests": data["requests"],
        "converged": data["converged"],  # every bucket it had to warm
        "required": f"{sum(b['converged_at'] is not None for b in required)}/{len(required)}",
        "optional": sum(1 for b in buckets if b["optional"] and b["rounds"]),
        "noise": statistics.median(noise) if noise else None,
    }


def markdown(results: dict[str, dict[str, list[dict[str, Any]]]], args: argparse.Namespace) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## The warm-up on a quiet and a noisy host (`benchmarks/noise.py`)",
        "",
        f"Measured {when} on this machine (2 cores, shared): `python -m benchmarks.noise "
        f"{' '.join(f'--model {m}' for m in args.model)} --runs {args.runs}`. `llmwarm warm` "
        "with the default profile; noisy: a busy loop on the other core, busy half of every "
        "100 ms. Alternating order; medians over the runs. Target: noisy ≤ 1.5× quiet, every "
        "bucket converged in both. The default profile's optional (`auto`) buckets run while "
        "the warm-up as a whole is within 10 % of the engine's start time, which a noisy host "
        "stretches too. *Warm request*: the "
        "geometric mean over the required buckets of their last round's median end-to-end "
        "latency, how much slower the host itself runs a warm request; *per request*: "
        "warm-up seconds per request sent, noisy over quiet.",
        "",
        "| model | host | warm-up | requests | converged (required buckets) | optional "
        "buckets reached | median noise | warm request | noisy / quiet: warm-up | warm "
        "request | per request |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, by_host in results.items():
        quiet = statistics.median(r["warmup_s"] for r in by_host["quiet"])
        quiet_steady = statistics.median(r["steady_s"] for r in by_host["quiet"])
        quiet_per = statistics.median(r["warmup_s"] / r["requests"] for r in by_host["quiet"])
        for host, runs in by_host.items():
            seconds = statistics.median(r["warmup_s"] for r in runs)
            steady = statistics.median(r["steady_s"] for r in runs)
            per = statistics.median(r["warmup_s"] / r["requests"] for r in runs)
            noise = [r["noise"] for r in runs if r["noise"] is not None]
            converged = ", ".join(
                f"{'yes' if r['converged'] else 'no'} ({r['required']})" for r in runs
            )
            optional = ", ".join(str(r["optional"]) for r in runs)
            lines.append(
                f"| {name} | {host} | {seconds:.1f} s | "
                f"{statistics.median(r['requests'] for r in runs):.0f} | {converged} | "
                f"{optional} | {(f'{statistics.median(noise):.1%}' if noise else '-')} | "
                f"{steady * 1000:.1f} ms | {seconds / quiet:.2f}× | {steady / quiet_steady:.2f}× "
                f"| {per / quiet_per:.2f}× |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_options(parser, ROOT / ".cache" / "bench-noise.log")
    args = parser.parse_args()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, path in models(args, ROOT):
        results[name] = {"quiet": [], "noisy": []}
        for run in range(args.runs):
            for host in ["quiet", "noisy"] if run % 2 == 0 else ["noisy", "quiet"]:
                with hog(host == "noisy"):
                    result = warm(path, args)
                results[name][host].append(result)
                print(f"{name} run {run + 1} {host}: {result}", flush=True)
    body = markdown(results, args)
    print(body)
    write_section(args.docs / "benchmarks.md", "noise", body)


if __name__ == "__main__":
    main()
