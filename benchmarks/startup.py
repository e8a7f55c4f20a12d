"""How well a start predicts its time to ready (`GET /startup`), over several real starts.

For each scenario, one priming start, then `--starts` measured ones of `llmwarm serve` on the
same model, flags and profile; each watches `/startup` from launch (a client warmed first, one
probe every 0.2 s) and takes the prediction `expected_ready_in_s` at two moments: the first
answer after launch, and the first once the engine has loaded (phase `warming`). Each is held
against the time that really remained until `/startup` said `ready`; the error is its share of
the start's time to ready (launch to ready).

    fresh            every start's compile caches empty (a new VLLM_CACHE_ROOT each); the
                     report of the start before it kept (`--report`: a pod that restarts)
    warm caches      one VLLM_CACHE_ROOT for all, the report kept
    baked, restart   `--cache-dir` of a bake, the report kept
    baked, new pod   `--cache-dir` of a bake, no report: predicted from the bake's manifest
                     (its engine start was a cold one)

Writes the `startup` section of docs/benchmarks.md.

    python -m benchmarks.startup --model .cache/tiny-llama --starts 3
    python -m benchmarks.startup --model .cache/smollm2 --starts 2 -- --dtype float32
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from benchmarks.launch import ENGINE_FLAGS, engine_env, free_port, launched
from benchmarks.pages import write_section

SCENARIOS = ("fresh", "warm caches", "baked, restart", "baked, new pod")


@dataclass
class Start:
    scenario: str
    ready_s: float  # launch to ready, as the client saw it
    first: tuple[float, float | None]  # (seconds after launch, predicted seconds left)
    loaded: tuple[float, float | None] | None
    source: str  # what the first prediction came from

    def error(self, at: tuple[float, float | None] | None) -> float | None:
        """|predicted - what really remained| over the time to ready."""
        if at is None or at[1] is None:
            return None
        return abs(at[1] - (self.ready_s - at[0])) / self.ready_s


def env(cache_root: Path) -> dict[str, str]:
    # VLLM_USE_AOT_COMPILE: vLLM's CPU build cannot load back its AOT artifacts
    return engine_env(VLLM_USE_AOT_COMPILE="0", VLLM_CACHE_ROOT=str(cache_root))


def watch(cmd: list[str], url: str, environ: dict[str, str], log: Path) -> dict[str, Any]:
    """Launch; every /startup answer until ready, with its time after launch."""
    seen: list[tuple[float, dict[str, Any]]] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        try:  # a client's first request costs it ~20 ms: not on the launch's clock
            client.get("/startup")
        except httpx.TransportError:
            pass
        start = time.perf_counter()
        with launched(cmd, environ, log) as proc:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"llmwarm exited with {proc.returncode}; see {log}")
                try:
                    body = client.get("/startup").json()
                except httpx.TransportError:
                    time.sleep(0.2)
                    continue
                seen.append((time.perf_counter() - start, body))
                if body["phase"] == "ready":
                    return {"seen": seen}
                time.sleep(0.2)


def one(scenario: str, args: argparse.Namespace, report: Path | None, cache: Path | None,
        cache_root: Path) -> Start:  # fmt: skip
    port = free_port()
    cmd = [sys.executable, "-m", "llmwarm", "serve", str(args.model), *ENGINE_FLAGS, *args.engine,
           "--host", "127.0.0.1", "--port", str(port),
           "--report", str(report) if report else os.devnull]  # fmt: skip
    if cache is not None:
        cmd += ["--cache-dir", str(cache)]
    if args.profile:
        cmd += ["--profile", str(args.profile)]
    seen = watch(cmd, f"http://127.0.0.1:{port}", env(cache_root), args.log)["seen"]
    ready_s = seen[-1][0]
    first_t, first = seen[0]
    loaded = next(((t, b) for t, b in seen if b["phase"] == "warming"), None)
    return Start(
        scenario,
        ready_s,
        (first_t, first["expected_ready_in_s"]),
        (loaded[0], loaded[1]["expected_ready_in_s"]) if loaded else None,
        first["expected_from"].split(" (/")[0],  # (not this machine's paths)
    )


def scenario(name: str, args: argparse.Namespace, work: Path) -> list[Start]:
    work.mkdir(parents=True)
    report = work / "report.json"
    root = work / "vllm-cache"
    baked = work / "baked"
    if name.startswith("baked"):
        with args.log.open("ab") as out:
            subprocess.run(
                [sys.executable, "-m", "llmwarm", "bake", str(args.model), *ENGINE_FLAGS,
                 *args.engine, *(["--profile", str(args.profile)] if args.profile else []),
                 "--cache-dir", str(baked), "--report", os.devnull],
                stdout=out, stderr=subprocess.STDOUT, env=env(work / "bake-root"), check=True,
            )  # fmt: skip
    starts = []
    for i in range(args.starts + 1):  # the first primes: its report seeds the next
        if name == "fresh":
            shutil.rmtree(root, ignore_errors=True)
        keep = None if name == "baked, new pod" else report
        cache = baked if name.startswith("baked") else None
        # a new pod from the bake: its own empty VLLM_CACHE_ROOT each time (llmwarm points
        # the compile caches at its live copy of the bake anyway)
        if name == "baked, new pod":
            shutil.rmtree(root, ignore_errors=True)
        start = one(name, args, keep, cache, root)
        if i > 0 or name == "baked, new pod":
            starts.append(start)
        print(
            f"{name} #{i}: ready in {start.ready_s:.1f} s; predicted "
            f"{start.first[1]} s left at {start.first[0]:.1f} s, "
            f"{start.loaded[1] if start.loaded else None} s at "
            f"{start.loaded[0] if start.loaded else 0:.1f} s",
            flush=True,
        )
    return starts[-args.starts :]


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def markdown(starts: list[Start], args: argparse.Namespace, seconds: float) -> str:
    rows = []
    for s in starts:
        loaded = s.loaded or (0.0, None)
        rows.append(
            f"| {s.scenario} | {s.ready_s:.1f} | {s.first[0]:.1f} | {_s(s.first[1])} | "
            f"{s.ready_s - s.first[0]:.1f} | {pct(s.error(s.first))} | {loaded[0]:.1f} | "
            f"{_s(loaded[1])} | {s.ready_s - loaded[0]:.1f} | {pct(s.error(s.loaded))} |"
        )
    summary = []
    for name in SCENARIOS:
        mine = [s for s in starts if s.scenario == name]
        if mine:
            summary.append(
                f"| {name} | {_median([s.error(s.first) for s in mine])} | "
                f"{_median([s.error(s.loaded) for s in mine])} | {mine[0].source} |"
            )
    command = "python -m benchmarks.startup " + shlex.join(
        ["--model", str(args.model), "--starts", str(args.starts)]
        + (["--profile", str(args.profile)] if args.profile else [])
        + [f"--scenario={name}" for name in args.scenario or []]
        + (["--", *args.engine] if args.engine else [])
    )
    every = [s.error(s.loaded) for s in starts]
    title = "" if args.section == "startup" else f", {args.model.name}"
    return f"""## Time to ready, predicted (`GET /startup`){title}

`{command}` ({datetime.now(timezone.utc):%Y-%m-%d}, this machine: 2 shared CPU cores; {
        seconds / 60:.0f} min). Each start's prediction (`expected_ready_in_s`) at its first
`/startup` answer after launch and at the first once the engine had loaded, against what
really remained until ready; the error is a share of the start's time to ready.

Median error once the engine has loaded, every scenario: **{_median(every)}**.

| scenario | median error, first answer | median error, engine loaded | predicted from |
|---|---|---|---|
{chr(10).join(summary)}

| scenario | ready (s) | first answer (s) | predicted left | really left | error | loaded (s) | predicted left | really left | error |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""  # noqa: E501


def _s(x: float | None) -> str:
    return "null" if x is None else f"{x:.1f}"


def _median(xs: list[float | None]) -> str:
    known = [x for x in xs if x is not None]
    return pct(statistics.median(known)) if known else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(".cache/tiny-llama"))
    parser.add_argument("--profile", type=Path, default=None, help="default: llmwarm's own")
    parser.add_argument("--starts", type=int, default=3, help="measured starts per scenario")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, default=None)
    parser.add_argument("--docs", type=Path, default=Path(__file__).parent.parent / "docs")
    parser.add_argument("--section", default="startup", help="of docs/benchmarks.md")
    parser.add_argument("--log", type=Path, default=Path("bench-startup.log"))
    parser.add_argument("engine", nargs="*", help="more `vllm serve` flags, after --")
    args = parser.parse_args()
    began = time.perf_counter()
    starts: list[Start] = []
    with tempfile.TemporaryDirectory(prefix="llmwarm-startup-bench-") as tmp:
        for i, name in enumerate(args.scenario or SCENARIOS):
            starts += scenario(name, args, Path(tmp) / str(i))
    body = markdown(starts, args, time.perf_counter() - began)
    print(body)
    write_section(args.docs / "benchmarks.md", args.section, body)


if __name__ == "__main__":
    main()
