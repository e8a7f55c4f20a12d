"""Time to ready from a baked compile cache against a fresh start, side by side in one run.

For each model (`--model NAME=PATH`, repeatable): bakes once (`llmwarm bake MODEL --cache-dir
BAKED`), then each run starts `llmwarm serve` three times on the same model, flags and profile,
rotating which goes first: with `--cache-dir` a new empty directory (fresh: every compile
cache empty), with `--cache-dir BAKED`, and with BAKED really read-only (a read-only bind
mount in a mount namespace of its own, `unshare`, as a pod mounts a shared volume). Times
launch to `/ready` 200 and reads engine start and warm-up time from each report. Writes the
`bake` section of docs/benchmarks.md.

    python -m benchmarks.bake --model tiny=.cache/tiny-llama --model smollm2=.cache/smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.launch import ENGINE_FLAGS, engine_env, free_port, ready_server
from benchmarks.pages import by_name, named_models, write_section

CACHES = ("fresh", "baked", "read-only")


def env() -> dict[str, str]:
    return engine_env()


def bake(model: str, args: argparse.Namespace, cache: Path, extra: list[str]) -> float:
    start = time.perf_counter()
    with args.log.open("ab") as out:
        subprocess.run(
            [sys.executable, "-m", "llmwarm", "bake", model, *ENGINE_FLAGS, *extra,
             "--cache-dir", str(cache), "--report", os.devnull],
            stdout=out, stderr=subprocess.STDOUT, env=env(), check=True,
        )  # fmt: skip
    return time.perf_counter() - start


def serve(
    model: str, args: argparse.Namespace, cache: Path, extra: list[str], read_only: bool = False
) -> dict[str, float]:
    port = free_port()
    report = Path(tempfile.mkdtemp(prefix="llmwarm-bake-bench-")) / "report.json"
    cmd = [sys.executable, "-m", "llmwarm", "serve", model, *ENGINE_FLAGS, *extra,
           "--host", "127.0.0.1", "--port", str(port), "--cache-dir", str(cache),
           "--report", str(report)]  # fmt: skip
    if read_only:
        mount = f"mount --bind {cache} {cache} && mount -o remount,bind,ro {cache}"
        cmd = ["unshare", "--mount", "--propagation", "private", "--",
               "sh", "-c", f"{mount} && exec {shlex.join(cmd)}"]  # fmt: skip
    with ready_server(cmd, f"http://127.0.0.1:{port}", "/ready", env(), args.log) as ready_s:
        pass
    data = json.loads(report.read_text())
    return {"ready_s": ready_s, "engine_start_s": data["engine_start_s"],
            "warmup_s": data["warmup_s"]}  # fmt: skip


def markdown(
    models: dict[str, str],
    baked: dict[str, float],
    runs: list[dict[str, Any]],
    args: argparse.Namespace,
) -> str:
    def med(name: str, cache: str, key: str) -> float:
        values = [r[key] for r in runs if r["model"] == name and r["cache"] == cache]
        return float(statistics.median(values))

    rows, ratios = [], []
    for name in models:
        for cache in CACHES:
            rows.append(
                f"| {name} | {cache} | {med(name, cache, 'ready_s'):.1f} "
                f"| {med(name, cache, 'engine_start_s'):.1f} | {med(name, cache, 'warmup_s'):.1f} |"
            )
        ratio = med(name, "baked", "ready_s") / med(name, "fresh", "ready_s")
        engine = med(name, "baked", "engine_start_s") / med(name, "fresh", "engine_start_s")
        ro_engine = med(name, "read-only", "engine_start_s") / med(name, "fresh", "engine_start_s")
        ro_ratio = med(name, "read-only", "ready_s") / med(name, "fresh", "ready_s")
        mine = [r for r in runs if r["model"] == name]
        per_run = ", ".join(
            f"{b['ready_s']:.1f}/{f['ready_s']:.1f}"
            for f, b in zip(
                [r for r in mine if r["cache"] == "fresh"],
                [r for r in mine if r["cache"] == "baked"],
                strict=True,
            )
        )
        ratios.append(
            f"- `{name}`: baked / fresh time to ready **{ratio:.2f}×**, engine start "
            f"{engine:.2f}×; read-only / fresh **{ro_ratio:.2f}×**, engine start {ro_engine:.2f}× "
            f"(bake {baked[name]:.1f} s; per run, baked/fresh: {per_run})."
        )
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    command = " ".join(f"--model {n}={p}" for n, p in models.items())
    return f"""## Baked compile caches (`llmwarm bake`)

Measured {when} (same machine), by

```bash
python -m benchmarks.bake {command} --runs {args.runs}
```

Per model, `llmwarm bake` once (a cold start plus the warm-up), then per run `llmwarm serve
--cache-dir` three times, the first rotating: a new empty directory (fresh), the baked one, and
the baked one mounted read-only (a bind mount in a mount namespace of its own). Default
profile; medians over {args.runs} runs; seconds.

| model | compile caches | time to ready | engine start | warm-up |
|---|---|---:|---:|---:|
{chr(10).join(rows)}

{chr(10).join(ratios)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    named_models(parser)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--log", type=Path, default=Path(".cache/bench-bake.log"))
    args, extra = parser.parse_known_args()
    models = by_name(args.model)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    runs, baked_s = [], {}
    for name, path in models.items():
        baked = Path(tempfile.mkdtemp(prefix="llmwarm-baked-"))
        print(f"{name}: baking ...", flush=True)
        baked_s[name] = bake(path, args, baked, extra)
        print(f"{name}: baked in {baked_s[name]:.1f} s", flush=True)
        for run in range(args.runs):
            order = CACHES[run % 3 :] + CACHES[: run % 3]
            for cache in order:
                directory = Path(tempfile.mkdtemp(prefix="fresh-")) if cache == "fresh" else baked
                timed = serve(path, args, directory, extra, read_only=cache == "read-only")
                result = {**timed, "model": name, "cache": cache, "run": run + 1}
                print(f"{name} run {run + 1} {cache:9}: ready {result['ready_s']:.1f} s (engine "
                      f"{result['engine_start_s']:.1f} s, warm-up {result['warmup_s']:.1f} s)",
                      flush=True)  # fmt: skip
                runs.append(result)
    body = markdown(models, baked_s, runs, args)
    write_section(args.docs / "benchmarks.md", "bake", body)
    print(body)


if __name__ == "__main__":
    main()
