"""How long llmwarm's own work holds the serving event loop: a 1 ms ticker's lag on that loop.

Two measurements, each side by side in one run:

  gate        the gate (coverage on, then off, alternating) in front of an app that reads each
              body as vLLM's does but parses nothing, served by uvicorn in this process, while a
              client process sends 5 MB chat bodies (an image as a data URL), two at a time;
              what is left is llmwarm's own work per request; then hostile bodies (a 400 KB
              prompt of escaped quotes, a prompt of 100,000 short strings: the kinds that cost
              the classifier a Python step each before it read chunks in C; a 400 KB prompt of
              backslash-quote pairs, the costliest to read now), coverage on and off: the
              difference is the classifier's, the rest the loop's reading them. On uvloop, as
              `vllm serve` and `llmwarm serve` run
  re-warm     `llmwarm serve MODEL` run in this process (its lifecycle on this loop, a real
              vLLM engine) with a wide profile (64 prompts of 512 tokens at once), the ticker
              beside it: serving idle, then during an open-gate `POST /warmup/run`

Run it on two checkouts (`--label before` on the older, then `--label after` with
`--compare` of the first's JSON) to put both in the docs page:

    python -m benchmarks.loop_lag --label before --json lag-before.json
    python -m benchmarks.loop_lag --label after --json lag-after.json \\
        --compare lag-before.json --docs docs/reliability.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from benchmarks.launch import ROOT
from benchmarks.pages import write_section

TICK = 0.001
ADMIN_KEY = "bench-admin"  # the re-warm's credential (over TCP, it needs one)
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
REWARM_PROFILE = textwrap.dedent("""\
    stream: [true]
    endpoints: [completions]
    buckets: [{prompt_tokens: 512, concurrency: 64, max_tokens: 8}]
    convergence: {window: 2, spread: 10, min_rounds: 2, max_rounds: 2}
""")


class Ticker:
    """A task that sleeps `TICK` again and again and records how late each wake-up was."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(TICK)
            self.lags.append(time.perf_counter() - start - TICK)

    def take(self) -> list[float]:
        lags, self.lags = self.lags, []
        return lags


def _stats(lags: list[float]) -> dict[str, float]:
    # uvloop's timers have a resolution of 1 ms and may wake a fraction early: no lag, not less
    ordered = sorted(max(0.0, lag) for lag in lags) or [0.0]
    return {
        "ticks": len(lags),
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "max_ms": 1000 * ordered[-1],
    }


async def _reads_body(scope: Any, receive: Any, send: Any) -> None:
    """vLLM's stand-in: reads the whole body (as FastAPI does) and parses none of it."""
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    payload = b'{"choices":[],"usage":{"prompt_tokens":300,"completion_tokens":16}}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})  # fmt: skip
    await send({"type": "http.response.body", "body": payload})


CLIENT = """
import base64, json, os, sys, time, httpx, concurrent.futures as cf
url, seconds, kind = sys.argv[1], float(sys.argv[2]), sys.argv[3]
image = "data:image/png;base64," + base64.b64encode(os.urandom(3_750_000)).decode()
if kind == "image":
    bodies = [{"model": "m", "max_tokens": 16, "logprobs": True, "messages": [{"role": "user",
        "content": [{"type": "text", "text": "what is it?"},
                    {"type": "image_url", "image_url": {"url": image}}]}]}]
else:  # hostile: what costs a naive reader a step per escape or per string
    bodies = [{"model": "m", "max_tokens": 16, "prompt": '"' * 200_000},
              {"model": "m", "max_tokens": 16, "prompt": ["a"] * 100_000},
              {"model": "m", "max_tokens": 16, "prompt": '\\"' * 100_000}]
bodies = [json.dumps(b).encode() for b in bodies]
end = time.monotonic() + seconds
def loop(i):
    sent = 0
    with httpx.Client(timeout=60) as c:
        while time.monotonic() < end:
            body = bodies[i % len(bodies)]
            c.post(url, content=body, headers={"content-type": "application/json"})
            i += 1
            sent += 1
    return sent
with cf.ThreadPoolExecutor(2) as pool:
    print(sum(pool.map(loop, range(2))))
"""


async def gate_lag(seconds: float, rounds: int) -> dict[str, Any]:
    from llmwarm.serve.gate import Gate
    from llmwarm.serve.state import RunState

    modes = ("on", "off", "hostile", "hostile-off")
    results: dict[str, list[float]] = {mode: [] for mode in modes}
    sent = dict.fromkeys(modes, 0)
    for i in range(rounds):
        for mode in modes if i % 2 == 0 else modes[::-1]:
            coverage, hostile = mode in ("on", "hostile"), mode.startswith("hostile")
            state = RunState(window=2)
            state.warming(_reads_body)
            state.serving()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            server = uvicorn.Server(uvicorn.Config(
                Gate(state, coverage=coverage), log_level="warning", lifespan="off",
                h11_max_incomplete_event_size=64 * 1024 * 1024,
            ))  # fmt: skip
            serving = asyncio.create_task(server.serve(sockets=[sock]))
            ticker = Ticker()
            path = "/v1/completions" if hostile else "/v1/chat/completions"
            client = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CLIENT, f"http://127.0.0.1:{port}{path}", str(seconds),
                "hostile" if hostile else "image", stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            await asyncio.sleep(1.0)  # the client's start-up (its 5 MB body) is not measured
            ticker.take()
            out, _ = await client.communicate()
            sent[mode] += int(out)
            results[mode] += ticker.take()
            ticker.task.cancel()
            server.should_exit = True
            await serving
            if coverage:
                assert state.coverage.covered + state.coverage.uncovered > 0, "none recorded"
    return {
        mode: _stats(lags) | {"bodies_per_s": sent[mode] / (rounds * seconds)}
        for mode, lags in results.items()
    }


async def _ready(client: httpx.AsyncClient) -> bool:
    try:
        return bool((await client.get("/live")).json()["status"] == "ready")
    except httpx.TransportError:
        return False  # not listening yet


async def rewarm_lag(model: str, idle_s: float) -> dict[str, Any]:
    """`llmwarm serve` in this process with a wide profile: the ticker while it serves idle,
    then during `POST /warmup/run` (open gate) of that profile."""
    from llmwarm.serve import server, settings

    profile = ROOT / ".cache" / "bench-loop-lag.yaml"
    profile.parent.mkdir(exist_ok=True)
    profile.write_text(REWARM_PROFILE)
    resolved = settings.resolve(
        [model, "--gpu-memory-utilization", "0.5", "--max-model-len", "1024", "--host",
         "127.0.0.1", "--port", "0", "--served-model-name", "m", "--max-num-seqs", "64"],
        profile_path=profile, report_path=None, plot_path=None, on_unconverged="serve",
        mode="serve", prog="bench", admin_key=ADMIN_KEY,
    )  # fmt: skip
    life = server.Lifecycle(resolved)
    run = asyncio.create_task(life.run())
    # (an older checkout kept its socket on the lifecycle itself)
    holder: Any = life.http if hasattr(life.http, "sock") else life
    port = holder.sock.getsockname()[1]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        while not await _ready(client):
            assert not run.done(), run
            await asyncio.sleep(0.2)
        ticker = Ticker()
        await asyncio.sleep(idle_s)
        idle = ticker.take()
        answer = await client.post("/warmup/run", json={}, headers=ADMIN)
        during = ticker.take()
        ticker.task.cancel()
    life.stop.set()
    await run
    assert answer.status_code == 200, answer.text
    return {"idle": _stats(idle), "rewarm": _stats(during)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="after")
    parser.add_argument("--model", default=str(ROOT / ".cache" / "tiny-llama"))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--compare", type=Path, help="the JSON of a run to show beside")
    parser.add_argument("--docs", type=Path)
    parser.add_argument("--gate-only", action="store_true", help="no re-warm (no engine)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import uvloop

    import llmwarm

    checkout = Path(llmwarm.__file__).resolve().parent  # the llmwarm measured
    result = {
        "label": args.label,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True
        ).stdout.strip(),
        "gate": uvloop.run(gate_lag(args.seconds, args.rounds)),
    }

    if not args.gate_only:
        result["rewarm"] = uvloop.run(rewarm_lag(args.model, idle_s=args.seconds))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.docs:
        runs = [json.loads(args.compare.read_text())] if args.compare else []
        write_section(args.docs, "loop-lag", markdown([*runs, result], args))


def markdown(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["## The serving loop's lag (`benchmarks/loop_lag.py`)", "",
             f"Measured {when} on this machine (2 cores, shared): a 1 ms ticker on the loop "
             "that serves users, p50 / p99 / max of how late it woke, in ms.", "",
             "| run | gate, coverage off | gate, coverage on | hostile bodies, coverage off "
             "| hostile bodies, coverage on | vLLM serving, idle | during a re-warm, gate open |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip

    def cell(s: dict[str, float] | None) -> str:
        if s is None:
            return "-"
        rate = f" ({s['bodies_per_s']:.0f} bodies/s)" if "bodies_per_s" in s else ""
        p50, p99 = (max(0.0, s[q]) for q in ("p50_ms", "p99_ms"))  # (see _stats)
        return f"{p50:.2f} / {p99:.2f} / {s['max_ms']:.1f}{rate}"

    for run in runs:
        gate, rewarm = run["gate"], run.get("rewarm")
        hostile = f"{cell(gate.get('hostile-off'))} | {cell(gate.get('hostile'))}"
        idle, during = (cell(rewarm["idle"]), cell(rewarm["rewarm"])) if rewarm else ("-", "-")
        lines.append(
            f"| {run['label']} ({run['commit']}) | {cell(gate['off'])} | {cell(gate['on'])} | "
            f"{hostile} | {idle} | {during} |"
        )
    lines += ["", "The gate's columns: 5 MB chat bodies (an image as a data URL), two at a time "
              "from another process, to an app that reads each body but parses nothing: what "
              "is left is llmwarm's own work per request; hostile bodies: a 400 KB prompt of "
              "escaped quotes, a prompt of 100,000 short strings and a 400 KB prompt of "
              "backslash-quote pairs, in turn, back to back from two client threads (bodies/s: "
              "how many the gate read and answered); the difference between their two columns "
              "is the classifier's. All on uvloop, as `vllm serve` runs. The re-warm's: "
              "`llmwarm serve` on "
              "the tiny model in the benchmark's own process, re-warming 64 prompts of 512 "
              "tokens at once (vLLM's own work on its loop included). Command: "
              f"`python -m benchmarks.loop_lag --seconds {args.seconds:g} --rounds "
              f"{args.rounds}` on each checkout (see its docstring)."]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
