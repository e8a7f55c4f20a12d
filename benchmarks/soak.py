"""A soak: minutes of mixed traffic through the OpenAI SDK, re-warms under it, and what grew.

Starts `llmwarm serve MODEL` (the minimal profile), then for `--minutes` sends mixed requests
at `--concurrency` (completions and chat, streamed and not, some with logprobs, a JSON schema or
penalties; prompts of a few to a few hundred tokens) and asks for a re-warm every
`--rewarm-every` seconds, alternately with and without `close_gate`. Counts every error (a 503
with Retry-After while a `close_gate` re-warm runs is the documented answer, counted apart),
and samples the resident memory of llmwarm and its EngineCore and llmwarm's open file
descriptors every 10 s. Writes the `soak` section of docs/reliability.md.

    python -m benchmarks.soak --model .cache/tiny-llama --minutes 10 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil

from benchmarks.launch import ENGINE_FLAGS, ROOT, engine_env, free_port, ready_server
from benchmarks.pages import write_section

SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 8}},
          "required": ["a"]}  # fmt: skip


class Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.gated = 0  # 503 + Retry-After during a close_gate re-warm: documented
        self.errors: Counter[str] = Counter()
        self.latencies: list[float] = []


async def one_request(sdk: openai.AsyncOpenAI, rng: random.Random, tally: Tally) -> None:
    words = " ".join(f"w{rng.randrange(1000)}" for _ in range(rng.choice([4, 30, 120, 300])))
    kind = rng.choice(["completions", "chat"])
    stream = rng.random() < 0.5
    extra: dict[str, Any] = {}
    feature = rng.choice([None, None, "logprobs", "json", "penalties"])
    if feature == "logprobs":
        extra = {"logprobs": 2} if kind == "completions" else {"logprobs": True, "top_logprobs": 2}
    elif feature == "json":
        extra = {"extra_body": {"structured_outputs": {"json": SCHEMA}}}
    elif feature == "penalties":
        extra = {"presence_penalty": 0.5, "frequency_penalty": 0.3}
    start = time.perf_counter()
    answer: Any
    try:
        if kind == "completions":
            answer = await sdk.completions.create(
                model="soak", prompt=words, max_tokens=rng.choice([4, 16, 32]), stream=stream,
                **extra,
            )  # fmt: skip
        else:
            answer = await sdk.chat.completions.create(
                model="soak", messages=[{"role": "user", "content": words}],
                max_tokens=rng.choice([4, 16, 32]), stream=stream, **extra,
            )  # fmt: skip
        if stream:
            async for _ in answer:
                pass
        tally.ok += 1
        tally.latencies.append(time.perf_counter() - start)
    except openai.APIStatusError as exc:
        if exc.status_code == 503 and exc.response.headers.get("retry-after"):
            tally.gated += 1
        else:
            tally.errors[f"HTTP {exc.status_code}: {str(exc)[:120]}"] += 1
    except openai.APIError as exc:
        tally.errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1


async def traffic(url: str, seconds: float, concurrency: int, tally: Tally) -> None:
    sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    deadline = time.monotonic() + seconds

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            await one_request(sdk, rng, tally)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    await sdk.close()


async def rewarms(url: str, seconds: float, every: float, log: list[dict[str, Any]]) -> None:
    deadline = time.monotonic() + seconds
    close = False
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        while time.monotonic() + every < deadline:
            await asyncio.sleep(every)
            close = not close
            start = time.monotonic()
            answer = await client.post("/warmup/run", json={"close_gate": close, "wait": True})
            log.append({"close_gate": close, "status": answer.status_code,
                        "seconds": time.monotonic() - start})  # fmt: skip


def _engine_core(llmwarm: psutil.Process) -> psutil.Process | None:
    for child in llmwarm.children(recursive=True):
        try:
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


async def sample(pid: int, seconds: float, rows: list[dict[str, float]]) -> None:
    llmwarm = psutil.Process(pid)
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        core = _engine_core(llmwarm)
        rows.append({
            "t": time.monotonic() - start,
            "llmwarm_mib": llmwarm.memory_info().rss / 2**20,
            "engine_mib": core.memory_info().rss / 2**20 if core else float("nan"),
            "fds": float(llmwarm.num_fds()),
        })  # fmt: skip
        await asyncio.sleep(10)


def _growth(rows: list[dict[str, float]], key: str) -> str:
    # after the first minute (allocators and caches settle), first against last
    settled = [r for r in rows if r["t"] >= 60] or rows
    first, last = settled[0][key], settled[-1][key]
    return f"{first:.0f} → {last:.0f} ({last - first:+.0f})"


def markdown(args: argparse.Namespace, tally: Tally, rewarm_log: list[dict[str, Any]],
             rows: list[dict[str, float]], ready_s: float) -> str:  # fmt: skip
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    total = tally.ok + tally.gated + sum(tally.errors.values())
    lines = [
        "## Soak (`benchmarks/soak.py`)",
        "",
        f"Measured {when} on this machine (2 cores, shared, vLLM CPU): `python -m benchmarks.soak "
        f"--model {args.model} --minutes {args.minutes:g} --concurrency {args.concurrency} "
        f"--rewarm-every {args.rewarm_every:g}`. Ready after {ready_s:.0f} s.",
        "",
        "| | |",
        "|---|---|",
        f"| requests | {total} ({tally.ok} answered, {tally.ok / (args.minutes * 60):.1f}/s) |",
        f"| errors | {sum(tally.errors.values())} |",
        f"| 503 + Retry-After during a `close_gate` re-warm (documented) | {tally.gated} |",
        f"| latency median / p99 | {statistics.median(tally.latencies) * 1000:.0f} ms / "
        f"{sorted(tally.latencies)[int(0.99 * (len(tally.latencies) - 1))] * 1000:.0f} ms |"
        if tally.latencies else "| latency | none answered |",
        f"| re-warms | {len(rewarm_log)}: "
        + ", ".join(f"{'close_gate' if r['close_gate'] else 'open'} → {r['status']} in "
                    f"{r['seconds']:.0f} s" for r in rewarm_log) + " |",
        f"| llmwarm resident memory, MiB (from minute 1 to the end) | "
        f"{_growth(rows, 'llmwarm_mib')} |",
        f"| EngineCore resident memory, MiB | {_growth(rows, 'engine_mib')} |",
        f"| llmwarm open file descriptors | {_growth(rows, 'fds')} |",
    ]  # fmt: skip
    for error, count in tally.errors.most_common(5):
        lines.append(f"| error ×{count} | `{error}` |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / ".cache" / "tiny-llama"))
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rewarm-every", type=float, default=120)
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--log", type=Path, default=ROOT / ".cache" / "soak.log")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "llmwarm", "serve", args.model, *ENGINE_FLAGS,
           "--port", str(port), "--served-model-name", "soak", "--profile",
           str(ROOT / "llmwarm" / "configs" / "minimal.yaml"), "--report", os.devnull,
           "--rewarm-min-interval", "0"]  # fmt: skip
    env = engine_env()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with ready_server(cmd, url, "/ready", env, args.log) as ready_s:
        pid = next(p.pid for p in psutil.Process().children() if "llmwarm" in " ".join(p.cmdline()))
        seconds = args.minutes * 60
        tally = Tally()
        rewarm_log: list[dict[str, Any]] = []
        rows: list[dict[str, float]] = []

        async def run() -> None:
            await asyncio.gather(
                traffic(url, seconds, args.concurrency, tally),
                rewarms(url, seconds, args.rewarm_every, rewarm_log),
                sample(pid, seconds, rows),
            )

        asyncio.run(run())
    body = markdown(args, tally, rewarm_log, rows, ready_s)
    print(body)
    write_section(args.docs / "reliability.md", "soak", body)


if __name__ == "__main__":
    main()
