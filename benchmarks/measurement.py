"""Does the warm-up measure what a client measures? Its report against vLLM's own benchmark.

Starts `llmwarm serve MODEL` with a one-bucket profile (`--input-len` tokens in, `--output-len`
out, `--concurrency` streams at once, completions), then, `--runs` times in pairs on that one
warm engine: a re-warm (`POST /warmup/run`, its report's warm median TTFT and TPOT) and
`vllm.benchmarks.serve` in a process of its own (random prompts of the same length, the same
number at once, EOS ignored: its median TTFT and TPOT), who goes first alternating. The ratio
is each pair's report / vLLM's benchmark; their median (lowest-highest) is the figure.
Writes the `measurement` section of docs/benchmarks.md.

    python -m benchmarks.measurement --runs 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from benchmarks.launch import ROOT, engine_env, free_port, ready_server
from benchmarks.pages import write_section
from benchmarks.serving import BENCH
from llmwarm.model.report import Report


def profile(args: argparse.Namespace) -> Path:
    path: Path = args.log.parent / "bench-measurement.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        endpoints: [completions]
        stream: [true]
        buckets:
          - {{prompt_tokens: {args.input_len}, concurrency: {args.concurrency},
              max_tokens: {args.output_len}}}
        convergence: {{window: 3, min_rounds: 4, max_rounds: 6}}
    """)
    )
    return path


def from_report(data: dict[str, Any]) -> dict[str, float]:
    """The bucket's warm medians, in ms, as the report gives them: of its last window's round
    medians (TTFT: of the rounds that sent prompts of their own, round 2 of a `tpot` bucket;
    the later ones sent its prompts again, their prefill cached)."""
    report = Report.model_validate(data)
    [bucket] = report.buckets
    warm = {metric: bucket.warm(metric, report.convergence.window) for metric in ("ttft", "tpot")}
    return {metric: 1000 * value for metric, value in warm.items() if value is not None}


def vllm_bench(model: str, port: int, args: argparse.Namespace, seed: int) -> dict[str, float]:
    cmd = [sys.executable, "-c", BENCH, "--backend", "vllm", "--base-url",
           f"http://127.0.0.1:{port}", "--model", "bench", "--tokenizer", model,
           "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--random-range-ratio", "0",
           "--num-prompts", str(args.concurrency), "--max-concurrency", str(args.concurrency),
           "--ignore-eos", "--seed", str(seed)]  # fmt: skip
    env = engine_env(LLMWARM_ADMIN_KEY="bench-admin")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    with args.log.open("a") as log:
        log.write(done.stdout + done.stderr)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            return {"ttft": result["median_ttft_ms"], "tpot": result["median_tpot_ms"]}
    raise SystemExit(f"vllm bench serve failed; see {args.log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / ".cache" / "tiny-llama"))
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--log", type=Path, default=ROOT / ".cache" / "bench-measurement.log")
    args = parser.parse_args()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "llmwarm", "serve", args.model, "--gpu-memory-utilization",
           "0.5", "--max-model-len", "1024", "--max-num-seqs", str(args.concurrency), "--port",
           str(port), "--host", "127.0.0.1", "--served-model-name", "bench", "--report",
           os.devnull, "--profile", str(profile(args)), "--rewarm-min-interval", "0"]  # fmt: skip
    env = engine_env()
    pairs: list[dict[str, dict[str, float]]] = []
    with ready_server(cmd, url, "/ready", env, args.log), httpx.Client(base_url=url) as client:
        for run in range(args.runs):
            pair: dict[str, dict[str, float]] = {}
            for who in ("report", "vllm") if run % 2 == 0 else ("vllm", "report"):
                if who == "report":
                    admin = {"authorization": "Bearer bench-admin"}
                    answer = client.post("/warmup/run", json={}, headers=admin, timeout=1800)
                    answer.raise_for_status()
                    pair[who] = from_report(answer.json())
                else:
                    pair[who] = vllm_bench(args.model, port, args, seed=run)
            print(f"pair {run}: {pair}", flush=True)
            pairs.append(pair)
    body = markdown(pairs, args)
    print(body)
    write_section(args.docs / "benchmarks.md", "measurement", body)


def markdown(pairs: list[dict[str, dict[str, float]]], args: argparse.Namespace) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## The warm-up's measurement against vLLM's benchmark (`benchmarks/measurement.py`)",
        "",
        f"Measured {when} on this machine (2 cores, shared, vLLM CPU, the tiny model): "
        f"`python -m benchmarks.measurement --runs {args.runs} --concurrency "
        f"{args.concurrency}`. One warm engine; in pairs, a re-warm of one bucket "
        f"({args.input_len} tokens in, {args.output_len} out, {args.concurrency} streams at "
        "once) and `vllm.benchmarks.serve` at the same shape in a process of its own. The "
        "report's figure is the median of the converged window's round medians; the ratio is "
        "each pair's report / vLLM's benchmark.",
        "",
        "| metric | report, ms | vLLM benchmark, ms | report / benchmark, per pair |",
        "|---|---|---|---|",
    ]
    for key, label in (("ttft", "median TTFT"), ("tpot", "median TPOT")):
        ours = [p["report"][key] for p in pairs]
        theirs = [p["vllm"][key] for p in pairs]
        ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
        lines.append(
            f"| {label} | {statistics.median(ours):.2f} | {statistics.median(theirs):.2f} | "
            f"**{statistics.median(ratios):.3f}×** ({min(ratios):.2f}–{max(ratios):.2f}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
