"""Serving speed once ready: vLLM's own serving benchmark against plain vLLM and llmwarm.

For each model (`--model NAME=PATH`, repeatable), it starts plain vLLM (`python -m
vllm.entrypoints.openai.api_server`) and `llmwarm serve` on the same model and flags and keeps
both up. Then, `--runs` + 1 times, it runs `vllm.benchmarks.serve` (random prompts,
`--input-len` in / `--output-len` out, `--prompts` prompts, EOS ignored) against one server,
then the other, who goes first alternating, in two modes:

* closed loop, `--concurrency` requests at once: the throughput;
* open loop, Poisson arrivals at half of plain vLLM's closed-loop throughput in the first pair
  (or `--rate`): TTFT, TPOT and ITL.

Why two. In a closed loop, requests of one length that start together end together, and the
next ones start together again: the run settles into waves (each new request's prefill queues
behind a whole wave's) or into a spread: plain vLLM's median TTFT moved between 21 and 36 ms
from one run to the next here, while its TPOT moved far less. Arrivals that do not wait on
completions measure the latency of the server rather than the regime the loop fell into, as
vLLM's own benchmarks set a request rate. The closed loop's median TTFT is still shown.

The idle server waits (vLLM's engine blocks on its input queue), and two runs back to back
share the host's moment: each pair's llmwarm / vLLM ratio is the comparison, their median
(lowest–highest) the figure. Each run of a pair sends new prompts (a seed of its own), the
same to both servers: no run finds its prompts in a prefix cache. The first pair, on servers
nobody else has sent to, is shown apart: plain vLLM's is its cold start, llmwarm's comes after
its warm-up. Writes the `serving` section of docs/benchmarks.md.

    python -m benchmarks.serving --model tiny=.cache/tiny-llama --runs 6
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone

from benchmarks.launch import ENGINE_FLAGS, ROOT, engine_env, free_port, ready_server
from benchmarks.pages import model_options, models, write_section

SERVERS = ("vllm", "llmwarm")
# (mode, metric): label, target
METRICS = {
    ("closed", "request_throughput"): ("throughput, requests/s (closed loop)", "≥ 0.98×"),
    ("closed", "output_throughput"): ("output tokens/s (closed loop)", ""),
    ("open", "median_ttft_ms"): ("median TTFT, ms", "≤ 1.02×"),
    ("open", "median_tpot_ms"): ("median TPOT, ms", "≤ 1.02×"),
    ("open", "median_itl_ms"): ("median ITL, ms", ""),
    ("open", "p99_ttft_ms"): ("p99 TTFT, ms", ""),
    ("closed", "median_ttft_ms"): ("median TTFT, ms (closed loop)", ""),
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
    return engine_env()


def server(kind: str, model: str, port: int) -> tuple[list[str], str]:
    flags = [*ENGINE_FLAGS, "--port", str(port), "--host", "127.0.0.1",
             "--served-model-name", "bench"]  # fmt: skip
    if kind == "vllm":
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                *flags], "/health"  # fmt: skip
    return [sys.executable, "-m", "llmwarm", "serve", model, *flags, "--report", os.devnull,
            "--profile", str(ROOT / "llmwarm" / "configs" / "default.yaml")], "/ready"  # fmt: skip


def bench(
    model: str, port: int, args: argparse.Namespace, seed: int, rate: float | None
) -> dict[str, float]:
    """One run: closed loop at `--concurrency` (no `rate`), else Poisson arrivals at `rate`."""
    load = ["--max-concurrency", str(args.concurrency)] if rate is None else [
        "--request-rate", f"{rate:.2f}"]  # fmt: skip
    cmd = [sys.executable, "-c", BENCH, "--backend", "vllm", "--base-url",
           f"http://127.0.0.1:{port}", "--model", "bench", "--tokenizer", model,
           "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--num-prompts", str(args.prompts),
           *load, "--ignore-eos", "--seed", str(seed)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env(), check=False)
    with args.log.open("a") as log:
        log.write(done.stdout + done.stderr)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    raise SystemExit(f"vllm bench serve failed; see {args.log}")


Run = dict[str, dict[str, float]]  # mode -> metrics
Pair = dict[str, Run]  # server -> its run


class Measured:
    """One model's pairs (the first apart) and the open loop's rate."""

    def __init__(self, pairs: list[Pair], rate: float) -> None:
        self.first, self.steady, self.rate = pairs[0], pairs[1:], rate

    def values(self, kind: str, mode: str, key: str) -> list[float]:
        return [pair[kind][mode][key] for pair in self.steady]

    def ratios(self, mode: str, key: str) -> list[float]:
        return [p["llmwarm"][mode][key] / p["vllm"][mode][key] for p in self.steady]


def markdown(results: dict[str, Measured], args: argparse.Namespace) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Serving once ready: plain vLLM against llmwarm (`benchmarks/serving.py`)",
        "",
        f"Measured {when} on this machine (2 cores, shared, vLLM CPU): "
        f"`python -m benchmarks.serving {' '.join(f'--model {m}' for m in args.model)} "
        f"--runs {args.runs}`. vLLM's own benchmark (`vllm.benchmarks.serve`): random prompts, "
        f"{args.input_len} tokens in, {args.output_len} out (EOS ignored), {args.prompts} "
        f"prompts a run; throughput in a closed loop of {args.concurrency} at once, latencies "
        "with Poisson arrivals at half of plain vLLM's throughput (the script's docstring says "
        "why). Both servers up side by side, runs in pairs back to back (who goes first "
        "alternates, new prompts each run): the ratio is each pair's llmwarm / vLLM, median "
        "(lowest–highest) over the pairs after the first. llmwarm serves the default "
        "profile's warm engine, its gate, metrics collector, coverage and watchdogs on the path.",
        "",
    ]
    for name, m in results.items():
        lines += [f"**{name}** (open loop at {m.rate:.1f} requests/s)", "",
                  "| | vLLM | llmwarm | llmwarm / vLLM, per pair | target | first pair |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for (mode, key), (label, target) in METRICS.items():
            v = statistics.median(m.values("vllm", mode, key))
            w = statistics.median(m.values("llmwarm", mode, key))
            each = m.ratios(mode, key)
            first = m.first["llmwarm"][mode][key] / m.first["vllm"][mode][key]
            lines.append(
                f"| {label} | {v:.2f} | {w:.2f} | **{statistics.median(each):.3f}×** "
                f"({min(each):.2f}–{max(each):.2f}) | {target} | {first:.2f}× |"
            )
        ttft = ", ".join(
            f"{a:.1f}/{b:.1f}"
            for a, b in zip(m.values("vllm", "closed", "median_ttft_ms"),
                            m.values("llmwarm", "closed", "median_ttft_ms"), strict=True)
        )  # fmt: skip
        lines += ["", f"Closed-loop median TTFT per pair (vLLM/llmwarm, ms): {ttft}.", ""]
    return "\n".join(lines)


def measure(name: str, path: str, args: argparse.Namespace) -> Measured:
    ports = {kind: free_port() for kind in SERVERS}
    pairs: list[Pair] = []
    rate: float | None = args.rate
    with contextlib.ExitStack() as up:
        for kind, port in ports.items():
            cmd, ready = server(kind, path, port)
            url = f"http://127.0.0.1:{port}"
            up.enter_context(ready_server(cmd, url, ready, env(), args.log))
        for run in range(args.runs + 1):
            order = SERVERS if run % 2 == 0 else SERVERS[::-1]
            pair: Pair = {kind: {} for kind in SERVERS}
            for seed, mode in enumerate(("closed", "open"), start=2 * run):
                for kind in order:
                    result = bench(path, ports[kind], args, seed=seed, rate=rate if mode == "open"
                                   else None)  # fmt: skip
                    pair[kind][mode] = result
                    print(f"{name} pair {run} {mode} {kind}: {result['request_throughput']:.2f} "
                          f"req/s, TTFT {result['median_ttft_ms']:.1f} ms, TPOT "
                          f"{result['median_tpot_ms']:.2f} ms", flush=True)  # fmt: skip
                if rate is None:  # half of what plain vLLM served in the first closed loop
                    rate = pair["vllm"]["closed"]["request_throughput"] / 2
            pairs.append(pair)
    assert rate is not None
    return Measured(pairs, rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_options(parser, ROOT / ".cache" / "bench-serving.log", runs=6)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=480)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--rate", type=float, default=None, help="open-loop requests/s (default: half of vLLM's)"
    )
    args = parser.parse_args()
    results = {name: measure(name, path, args) for name, path in models(args, ROOT)}
    body = markdown(results, args)
    print(body)
    write_section(args.docs / "benchmarks.md", "serving", body)


if __name__ == "__main__":
    main()
