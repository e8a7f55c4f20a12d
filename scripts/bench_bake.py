"""Time to ready from a baked compile cache against a fresh start, side by side in one run.

Bakes once (`llmwarm bake MODEL --cache-dir BAKED`), then each run starts `llmwarm serve` twice
on the same model, flags and profile, alternating which goes first: with `--cache-dir` a new
empty directory (fresh: every compile cache empty) and with `--cache-dir BAKED`. Times launch
to `/ready` 200 and reads engine start and warm-up time from each report. Writes the `bake`
section of docs/benchmarks.md.

    python scripts/bench_bake.py --model .cache/tiny-llama --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchlib import free_port, ready_server, write_section

ENGINE_FLAGS = ["--gpu-memory-utilization", "0.5", "--max-model-len", "1024"]


def env() -> dict[str, str]:
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}


def bake(args: argparse.Namespace, cache: Path, extra: list[str]) -> float:
    start = time.perf_counter()
    with args.log.open("ab") as out:
        subprocess.run(
            [sys.executable, "-m", "llmwarm", "bake", args.model, *ENGINE_FLAGS, *extra,
             "--cache-dir", str(cache), "--report", os.devnull],
            stdout=out, stderr=subprocess.STDOUT, env=env(), check=True,
        )  # fmt: skip
    return time.perf_counter() - start


def serve(args: argparse.Namespace, cache: Path, extra: list[str]) -> dict[str, float]:
    port = free_port()
    report = Path(tempfile.mkdtemp(prefix="llmwarm-bake-bench-")) / "report.json"
    cmd = [sys.executable, "-m", "llmwarm", "serve", args.model, *ENGINE_FLAGS, *extra,
           "--host", "127.0.0.1", "--port", str(port), "--cache-dir", str(cache),
           "--report", str(report)]  # fmt: skip
    with ready_server(cmd, f"http://127.0.0.1:{port}", "/ready", env(), args.log) as ready_s:
        pass
    data = json.loads(report.read_text())
    return {"ready_s": ready_s, "engine_start_s": data["engine_start_s"],
            "warmup_s": data["warmup_s"]}  # fmt: skip


def markdown(bake_s: float, runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    def med(cache: str, key: str) -> float:
        return float(statistics.median(r[key] for r in runs if r["cache"] == cache))

    rows = []
    for cache in ("fresh", "baked"):
        rows.append(
            f"| {cache} | {med(cache, 'ready_s'):.1f} | {med(cache, 'engine_start_s'):.1f} "
            f"| {med(cache, 'warmup_s'):.1f} |"
        )
    ratio = med("baked", "ready_s") / med("fresh", "ready_s")
    per_run = ", ".join(
        f"{b['ready_s']:.1f}/{f['ready_s']:.1f}"
        for f, b in zip(
            [r for r in runs if r["cache"] == "fresh"],
            [r for r in runs if r["cache"] == "baked"],
            strict=True,
        )
    )
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    return f"""## Baked compile caches (`llmwarm bake`)

Measured {when} (same machine and model), by

```bash
python scripts/bench_bake.py --model MODEL --runs {args.runs}
```

`llmwarm bake` once ({bake_s:.1f} s, a cold start plus the warm-up), then per run `llmwarm
serve --cache-dir` twice, alternately first: a new empty directory (fresh) and the baked one.
Default profile; medians over {args.runs} runs; seconds.

| compile caches | time to ready | engine start | warm-up |
|---|---:|---:|---:|
{chr(10).join(rows)}

Baked / fresh time to ready: **{ratio:.2f}×** (per run, baked/fresh: {per_run}).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--log", type=Path, default=Path(".cache/bench-bake.log"))
    args, extra = parser.parse_known_args()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    baked = Path(tempfile.mkdtemp(prefix="llmwarm-baked-"))
    print("baking ...", flush=True)
    bake_s = bake(args, baked, extra)
    print(f"baked in {bake_s:.1f} s", flush=True)
    runs = []
    for run in range(args.runs):
        order = ("fresh", "baked") if run % 2 == 0 else ("baked", "fresh")
        for cache in order:
            directory = baked if cache == "baked" else Path(tempfile.mkdtemp(prefix="fresh-"))
            result = {**serve(args, directory, extra), "cache": cache, "run": run + 1}
            print(f"run {run + 1} {cache:5}: ready {result['ready_s']:.1f} s (engine "
                  f"{result['engine_start_s']:.1f} s, warm-up {result['warmup_s']:.1f} s)",
                  flush=True)  # fmt: skip
            runs.append(result)
    body = markdown(bake_s, runs, args)
    write_section(args.docs / "benchmarks.md", "bake", body)
    print(body)


if __name__ == "__main__":
    main()
