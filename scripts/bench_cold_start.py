"""Side by side, in one run: plain vLLM's OpenAI server against `llmwarm serve`.

Each run starts each server in turn (alternating which goes first), on the same model and
flags, once with fresh compile caches (empty VLLM_CACHE_ROOT and TORCHINDUCTOR_CACHE_DIR) and once
with warm ones; it
times launch to ready (`/health` 200 for vLLM, `/ready` 200 for llmwarm) and, the moment the
server is ready, runs `llmwarm bench` against it. Writes docs/benchmarks.md and a chart from
the medians over the runs (its `cold-start` section); `--json` keeps every number.

    python scripts/bench_cold_start.py --model .cache/tiny-llama --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchlib import free_port, ready_server, write_section

from llmwarm import bench
from llmwarm.profile import load_profile, shipped

ENGINE_FLAGS = ["--gpu-memory-utilization", "0.5", "--max-model-len", "1024"]
SERVERS = ("vllm", "llmwarm")
CACHES = ("fresh", "warm")


def command(server: str, model: str, port: int, extra: list[str]) -> tuple[list[str], str]:
    common = [*ENGINE_FLAGS, "--host", "127.0.0.1", "--port", str(port),
              "--served-model-name", "m", *extra]  # fmt: skip
    if server == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        return cmd + common, "/health"
    return [sys.executable, "-m", "llmwarm", "serve", model, *common, "--report", os.devnull], (
        "/ready"
    )


def one(server: str, cache_root: str, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    port = free_port()
    cmd, ready_path = command(server, args.model, port, extra)
    # vLLM's caches and torch inductor's own (which lives outside VLLM_CACHE_ROOT)
    env = {
        **os.environ,
        "VLLM_CACHE_ROOT": cache_root,
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache_root, "inductor"),
    }
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    url = f"http://127.0.0.1:{port}"
    with ready_server(cmd, url, ready_path, env, args.log) as ready_s:
        report = asyncio.run(probe(url, args))
    return {"server": server, "ready_s": ready_s, "bench": json.loads(report.model_dump_json())}


async def probe(url: str, args: argparse.Namespace) -> bench.BenchReport:
    profile = load_profile(shipped("probe"))
    return await bench.probe(url, profile=profile, repeats=args.repeats, model="m")


def med(values: list[float]) -> float:
    return statistics.median(values)


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cache in CACHES:
        for server in SERVERS:
            runs = [r for r in results if r["server"] == server and r["cache"] == cache]
            kinds: dict[str, list[float]] = {}
            for r in runs:
                for k in r["bench"]["kinds"]:
                    if k["ratio"] is not None:
                        kinds.setdefault(f"{k['bucket']} {k['kind']}", []).append(k["ratio"])
            out[f"{server}/{cache}"] = {
                "ready_s": med([r["ready_s"] for r in runs]),
                "worst": med([r["bench"]["worst_ratio"] for r in runs]),
                "geomean": med([r["bench"]["geomean_ratio"] for r in runs]),
                "kinds": {name: med(v) for name, v in kinds.items()},
                "runs": len(runs),
            }
    return out


def chart(s: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True,
                                      gridspec_kw={"width_ratios": [1, 3]})  # fmt: skip
    labels = [f"{srv}\n{cache}" for cache in CACHES for srv in SERVERS]
    left.bar(labels, [s[f"{srv}/{cache}"]["ready_s"] for cache in CACHES for srv in SERVERS],
             color=["#999", "#2a7", "#bbb", "#6c9"])  # fmt: skip
    left.set_ylabel("seconds from launch to ready (median)")
    left.set_title("time to ready")
    kinds = sorted(s["vllm/warm"]["kinds"], key=lambda k: -s["vllm/warm"]["kinds"][k])[:20]
    x = range(len(kinds))
    for offset, srv, color in ((-0.2, "vllm", "#999"), (0.2, "llmwarm", "#2a7")):
        right.bar([i + offset for i in x], [s[f"{srv}/warm"]["kinds"].get(k, 0) for k in kinds],
                  width=0.4, label=srv, color=color)  # fmt: skip
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_xticks(list(x), kinds, rotation=60, ha="right", fontsize=7)
    right.set_ylabel("first / steady latency (median)")
    right.set_title("cold penalty per request kind, warm compile caches (20 worst for vLLM)")
    right.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(s: dict[str, Any], args: argparse.Namespace, png: str) -> str:
    rows = [
        f"| {srv} | {cache} | {s[f'{srv}/{cache}']['ready_s']:.1f} | "
        f"{s[f'{srv}/{cache}']['worst']:.2f}× | {s[f'{srv}/{cache}']['geomean']:.2f}× |"
        for cache in CACHES for srv in SERVERS
    ]  # fmt: skip
    kinds = sorted(s["vllm/warm"]["kinds"], key=lambda k: -s["vllm/warm"]["kinds"][k])
    kind_rows = [
        f"| {k} | {s['vllm/warm']['kinds'][k]:.2f}× | {s['llmwarm/warm']['kinds'].get(k, 0):.2f}× |"
        for k in kinds
    ]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    return "\n".join(
        [
            "## Plain vLLM against llmwarm",
            "",
            f"Measured {when} on this project's machine ({platform.machine()}, {os.cpu_count()} "
            f"cores, no GPU) with vLLM's CPU build and the tiny random Llama of "
            "`scripts/make_tiny_model.py`, by",
            "",
            "```bash",
            f"python scripts/bench_cold_start.py --model MODEL --runs {args.runs} "
            f"--repeats {args.repeats}",
            "```",
            "",
            "Each run starts plain vLLM (`python -m vllm.entrypoints.openai.api_server`) and "
            "`llmwarm serve` (default profile) on the same model and flags, alternately, with "
            "empty compile caches (vLLM's and torch inductor's) and with warm ones; time to "
            "ready is launch to `/health` 200 "
            "(vLLM) or `/ready` 200 (llmwarm). The moment each is ready, `llmwarm bench` (the "
            "shipped `configs/probe.yaml`) sends every request kind once, then "
            f"{args.repeats} more times: the ratio is the first request's latency over the "
            f"median of the repeats. Medians over {args.runs} runs.",
            "",
            "| server | compile cache | time to ready, s | worst first/steady "
            "| geomean first/steady |",
            "|---|---|---:|---:|---:|",
            *rows,
            "",
            f"![time to ready and cold penalty per kind]({png})",
            "",
            "First/steady per request kind (warm compile caches), worst for plain vLLM first:",
            "",
            "| bucket and kind | vLLM | llmwarm |",
            "|---|---:|---:|",
            *kind_rows,
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="steady requests per kind")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--log", type=Path, default=Path(".cache/bench.log"))
    args, extra = parser.parse_known_args()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    warm_root = tempfile.mkdtemp(prefix="llmwarm-bench-warm-")
    print("priming the warm compile cache ...", flush=True)
    one("vllm", warm_root, args, extra)
    results = []
    for run in range(args.runs):
        for cache in CACHES:
            order = SERVERS if run % 2 == 0 else SERVERS[::-1]
            for server in order:
                root = warm_root if cache == "warm" else tempfile.mkdtemp(prefix="llmwarm-fresh-")
                result = {**one(server, root, args, extra), "cache": cache, "run": run + 1}
                b = result["bench"]
                print(f"run {run + 1} {cache:5} {server:7}: ready {result['ready_s']:5.1f} s, "
                      f"worst {b['worst_ratio']:.2f}x, geomean {b['geomean_ratio']:.2f}x",
                      flush=True)  # fmt: skip
                results.append(result)
    s = summary(results)
    args.docs.mkdir(parents=True, exist_ok=True)
    chart(s, args.docs / "benchmarks.png")
    write_section(args.docs / "benchmarks.md", "cold-start", markdown(s, args, "benchmarks.png"))
    if args.json:
        args.json.write_text(json.dumps({"summary": s, "results": results}, indent=2))
    print((args.docs / "benchmarks.md").read_text())


if __name__ == "__main__":
    main()
