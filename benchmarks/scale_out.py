"""What each way of scaling out costs in time to ready, side by side on the same cores.

Brings up, one layout after the other, the same model with the same profile on this
machine's two cores (one core an engine, `VLLM_CPU_OMP_THREADS_BIND`):
- two replicas: two `llmwarm serve`, one engine each, started at once (behind a balancer);
- data parallelism, one server: `llmwarm serve --data-parallel-size 2`, which warms both
  ranks through its one API server (each request pinned to its rank);
- two nodes: a head `llmwarm serve --data-parallel-size 2 --data-parallel-size-local 1` and a
  `--headless` one for rank 1 (both on loopback), the head warming both ranks.
For each: the seconds until every `/ready` is 200, split by the reports into engine start and
warm-up, and the warm-up's requests. Data parallelism with one server per rank (external
load balancing) is not run: vLLM takes it for mixtures of experts only, which vLLM-CPU 0.32
cannot run under data parallelism. Writes the `scale-out` section of docs/scale-out.md and of
deploy/README.md.

    python -m benchmarks.scale_out
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.launch import ENGINE_FLAGS, ROOT, engine_env, free_port, launched, wait_ready
from benchmarks.pages import model_options, models, write_section

LLMWARM = [sys.executable, "-m", "llmwarm", "serve"]
FLAGS = [*ENGINE_FLAGS, "--host", "127.0.0.1"]


def _servers(model: str, profile: str, layout: str, out: Path) -> list[tuple[str, list[str]]]:
    """(environment's core binding, argv) of each process of a layout; reports go to `out`."""
    base = [*LLMWARM, model, *FLAGS, "--profile", profile]
    if layout == "two replicas":
        return [("0" if i == 0 else "1", [*base, "--report", str(out / f"r{i}.json")])
                for i in range(2)]  # fmt: skip
    if layout == "data parallel, one server":
        return [("0|1", [*base, "--data-parallel-size", "2", "--report", str(out / "r0.json")])]
    rpc = ["--data-parallel-size", "2", "--data-parallel-size-local", "1",
           "--data-parallel-address", "127.0.0.1",
           "--data-parallel-rpc-port", str(free_port())]  # fmt: skip
    return [("0", [*base, *rpc, "--report", str(out / "r0.json")]),
            ("1", [*base, *rpc, "--headless", "--data-parallel-start-rank", "1"])]  # fmt: skip


@contextlib.contextmanager
def _layout(model: str, profile: str, layout: str, out: Path, log: Path) -> Iterator[float]:
    """Every process of the layout launched at once; the seconds until each server's /ready
    said 200 (a --headless node has none: it is up when its head is)."""
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        servers = []
        for cores, argv in _servers(model, profile, layout, out):
            env = engine_env(VLLM_CPU_OMP_THREADS_BIND=cores)
            if "--headless" in argv:
                stack.enter_context(launched(argv, env, log))
                continue
            url = f"http://127.0.0.1:{free_port()}"
            argv = [*argv, "--port", url.rsplit(":", 1)[1]]
            servers.append((stack.enter_context(launched(argv, env, log)), url))
        for proc, url in servers:
            wait_ready(proc, url, "/ready", log)
        yield time.perf_counter() - started


def measure(model: str, profile: str, layout: str, log: Path) -> dict[str, float]:
    out = log.parent / "bench-scale-out"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.json"):
        old.unlink()
    with _layout(model, profile, layout, out, log) as ready_s:
        pass
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert all(r["error"] is None for r in reports), [r["error"] for r in reports]
    return {
        "ready": ready_s,
        "engine": max(r["engine_start_s"] for r in reports),
        "warmup": max(r["warmup_s"] for r in reports),
        "requests": sum(r["requests"] for r in reports),
        "buckets": sum(len(r["buckets"]) for r in reports),
    }


LAYOUTS = ["two replicas", "data parallel, one server", "two nodes (--headless)"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_options(parser, ROOT / ".cache" / "bench-scale-out.log", runs=1)
    parser.add_argument("--profile", default=str(ROOT / "llmwarm" / "configs" / "default.yaml"))
    args = parser.parse_args()
    rows = []
    for name, path in models(args, ROOT):
        for layout in LAYOUTS:
            runs = [measure(path, args.profile, layout, args.log) for _ in range(args.runs)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"{name} {layout}: ready in {med['ready']:.1f} s", flush=True)
            rows.append(
                f"| {name} | {layout} | {med['ready']:.1f} s | {med['engine']:.1f} s | "
                f"{med['warmup']:.1f} s | {med['buckets']:.0f} | {med['requests']:.0f} |"
            )
    profile = Path(args.profile).resolve().relative_to(ROOT)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    body = "\n".join([
        f"Measured {when} on this machine's 2 cores (one an engine), profile `{profile}`, "
        f"median of {args.runs} run(s) per layout: `python -m benchmarks.scale_out"
        f"{' --runs ' + str(args.runs) if args.runs != 1 else ''}`. Ready: from launch until "
        "every server's `/ready` said 200; engine start and warm-up: the longest of the "
        "reports'; buckets and requests: what the warm-ups sent, all ranks and replicas.",
        "",
        "| model | layout | ready | engine start | warm-up | buckets warmed | requests |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])  # fmt: skip
    write_section(args.docs / "scale-out.md", "scale-out", body)
    write_section(ROOT / "deploy" / "README.md", "scale-out", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
