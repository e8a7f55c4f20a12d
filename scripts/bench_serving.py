"""Serving speed once ready: vLLM's own serving benchmark against plain vLLM and llmwarm.

For each model (`--model NAME=PATH`, repeatable), each run starts plain vLLM (`python -m
vllm.entrypoints.openai.api_server`) and `llmwarm serve` on the same model and flags, in turn
(who goes first alternates), waits until ready (vLLM `/health`, llmwarm `/ready`), then runs
`vllm.benchmarks.serve` against it (random prompts, `--input-len` in / `--output-len` out,
`--prompts` prompts, `--concurrency` at once, EOS ignored) and stops it. Ratios are llmwarm
over vLLM: of the medians over the runs, and the median of each run's own ratio (the two
servers of a run ran minutes apart, so a slow spell of a shared host that spans the run
cancels out). Writes the `serving` section of docs/benchmarks.md.

    python scripts/bench_serving.py --model tiny=.cache/tiny-llama --runs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from benchlib import free_port, model_options, models, ready_server, write_section

ROOT = Path(__file__).resolve().parent.parent
ENGINE_FLAGS = ["--gpu-memory-utilization", "0.5", "--max-model-len", "1024"]
METRICS = {
    "request_throughput": "throughput, requests/s",
    "output_throughput": "output tokens/s",
    "median_ttft_ms": "median TTFT, ms",
    "median_tpot_ms": "median TPOT, ms",
    "median_itl_ms": "median ITL, ms",
    "p99_ttft_ms": "p99 TTFT, ms",
}

BENCH = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
result = main(parser.parse_args(sys.argv[1:]))
print("RESULT " + json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))}))
"""


def env() -> dict[str, str]:
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}


def server(kind: str, model: str, port: int) -> tuple[list[str], str]:
    flags = [*ENGINE_FLAGS, "--port", str(port), "--host", "127.0.0.1",
             "--served-model-name", "bench"]  # fmt: skip
    if kind == "vllm":
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                *flags], "/health"  # fmt: skip
    return [sys.executable, "-m", "llmwarm", "serve", model, *flags, "--report", os.devnull,
            "--profile", str(ROOT / "llmwarm" / "configs" / "default.yaml")], "/ready"  # fmt: skip


def bench(model: str, port: int, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, "-c", BENCH, "--backend", "vllm", "--base-url",
           f"http://127.0.0.1:{port}", "--model", "bench", "--tokenizer", model,
           "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--num-prompts", str(args.prompts),
           "--max-concurrency", str(args.concurrency), "--ignore-eos", "--seed", "0"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env(), check=False)
    with args.log.open("a") as log:
        log.write(done.stdout + done.stderr)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    raise SystemExit(f"vllm bench serve failed; see {args.log}")


Results = dict[str, dict[str, list[dict[str, float]]]]  # model -> server -> runs


def markdown(results: Results, args: argparse.Namespace) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Serving once ready: plain vLLM against llmwarm (`scripts/bench_serving.py`)",
        "",
        f"Measured {when} on this machine (2 cores, shared, vLLM CPU): "
        f"`python scripts/bench_serving.py {' '.join(f'--model {m}' for m in args.model)} "
        f"--runs {args.runs}`. vLLM's own benchmark (`vllm.benchmarks.serve`): random prompts, "
        f"{args.input_len} tokens in, {args.output_len} out (EOS ignored), {args.prompts} "
        f"prompts, {args.concurrency} at once; each server started fresh, in alternating order; "
        "medians over the runs, and the median (lowest–highest) of each run's own llmwarm / "
        "vLLM ratio. llmwarm serves the default profile's warm engine, its gate, metrics "
        "collector, coverage and watchdogs on the path.",
        "",
    ]
    for name, by_kind in results.items():
        lines += [f"**{name}**", "", "| | vLLM | llmwarm | llmwarm / vLLM | per run: median "
                  "(lowest–highest) | target |", "|---|---|---|---|---|---|"]  # fmt: skip
        for key, label in METRICS.items():
            v = statistics.median(r[key] for r in by_kind["vllm"])
            w = statistics.median(r[key] for r in by_kind["llmwarm"])
            ratios = [b[key] / a[key] for a, b in zip(by_kind["vllm"], by_kind["llmwarm"],
                                                      strict=True)]  # fmt: skip
            target = "≥ 0.98×" if key == "request_throughput" else (
                "≤ 1.02×" if key in ("median_ttft_ms", "median_tpot_ms") else ""
            )  # fmt: skip
            lines.append(
                f"| {label} | {v:.2f} | {w:.2f} | {w / v:.3f}× | "
                f"{statistics.median(ratios):.3f}× ({min(ratios):.2f}–{max(ratios):.2f}) | "
                f"{target} |"
            )
        per_run = ", ".join(
            f"{r['request_throughput']:.2f}/{w['request_throughput']:.2f}"
            for r, w in zip(by_kind["vllm"], by_kind["llmwarm"], strict=True)
        )
        lines += ["", f"Throughput per run (vLLM/llmwarm, requests/s): {per_run}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_options(parser, ROOT / ".cache" / "bench-serving.log")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=160)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    results: Results = {}
    for name, path in models(args, ROOT):
        results[name] = {"vllm": [], "llmwarm": []}
        for run in range(args.runs):
            order = ["vllm", "llmwarm"] if run % 2 == 0 else ["llmwarm", "vllm"]
            for kind in order:
                port = free_port()
                cmd, ready = server(kind, path, port)
                with ready_server(cmd, f"http://127.0.0.1:{port}", ready, env(), args.log):
                    result = bench(path, port, args)
                results[name][kind].append(result)
                print(f"{name} run {run + 1} {kind}: {result['request_throughput']:.2f} req/s, "
                      f"TTFT {result['median_ttft_ms']:.1f} ms, TPOT "
                      f"{result['median_tpot_ms']:.2f} ms", flush=True)  # fmt: skip
    body = markdown(results, args)
    print(body)
    write_section(args.docs / "benchmarks.md", "serving", body)


if __name__ == "__main__":
    main()
