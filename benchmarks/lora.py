"""A LoRA adapter loaded at run time: its first request against its steady latency, plain vLLM
and llmwarm side by side, per request kind.

Each run starts plain vLLM (`python -m vllm.entrypoints.openai.api_server`) and `llmwarm serve`
on the same model and flags (`--enable-lora`, `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`), one
after the other (the order alternates from run to run), and on each: loads the adapter
(`POST /v1/load_lora_adapter`), then, kind after kind, times the first request on it that is
answered (llmwarm answers 503 while the adapter warms: those are not run on the model, and the
client retries after 0.1 s) and then `--steady` more; a kind's ratio is its first request's
latency over the median of the rest. A client is warmed before it times anything. Also times
the load itself to the first answered request (llmwarm's includes the adapter's warm-up).
Writes the `lora` section of docs/benchmarks.md.

    python -m benchmarks.lora --model .cache/tiny-llama --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from benchmarks.launch import ENGINE_FLAGS, engine_env, free_port, launched, wait_ready
from benchmarks.pages import write_section

LORA_FLAGS = [*ENGINE_FLAGS, "--enable-lora", "--max-lora-rank", "8", "--max-loras", "1"]
SERVERS = ("vllm", "llmwarm")
# (name, endpoint, stream): what users send an adapter
KINDS = (
    ("completions", "/v1/completions", False),
    ("completions-stream", "/v1/completions", True),
    ("chat", "/v1/chat/completions", False),
    ("chat-stream", "/v1/chat/completions", True),
)


def body(path: str, stream: bool, i: int) -> dict[str, Any]:
    text = f"request {i}: select the rows"
    if path == "/v1/chat/completions":
        out: dict[str, Any] = {"messages": [{"role": "user", "content": text}]}
    else:
        out = {"prompt": text}
    return {"model": "sql", "max_tokens": 8, "stream": stream, **out}


def timed(client: httpx.Client, path: str, stream: bool, i: int) -> float | None:
    """Seconds to the whole answer; None for a 503 (llmwarm: the adapter still warms)."""
    start = time.perf_counter()
    with client.stream("POST", path, json=body(path, stream, i)) as r:
        for _ in r.iter_bytes():
            pass
    if r.status_code == 503:
        return None
    r.raise_for_status()
    return time.perf_counter() - start


def one(server: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    port = free_port()
    model = str(args.model)
    if server == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        ready = "/health"
    else:
        cmd = [sys.executable, "-m", "llmwarm", "serve", model, "--report", os.devnull]
        ready = "/ready"
    cmd += [*LORA_FLAGS, "--host", "127.0.0.1", "--port", str(port)]
    env = engine_env(
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
        VLLM_USE_AOT_COMPILE="0",
        VLLM_CACHE_ROOT=str(tmp / server),
    )
    url = f"http://127.0.0.1:{port}"
    with launched(cmd, env, args.log) as proc:
        wait_ready(proc, url, ready, args.log)
        with httpx.Client(base_url=url, timeout=300) as client:
            client.get("/v1/models")  # (a client's first request costs it ~20 ms)
            loaded_at = time.perf_counter()
            r = client.post(
                "/v1/load_lora_adapter",
                json={"lora_name": "sql", "lora_path": str(args.model / "lora")},
            )
            r.raise_for_status()
            result: dict[str, Any] = {"load_s": time.perf_counter() - loaded_at, "kinds": {}}
            i = 0
            for name, path, stream in KINDS:
                while (first := timed(client, path, stream, i)) is None:  # 503: warming
                    i += 1
                    time.sleep(0.1)
                if "served_after_s" not in result:
                    result["served_after_s"] = time.perf_counter() - loaded_at
                steady = [timed(client, path, stream, i + 1 + k) for k in range(args.steady)]
                i += args.steady + 1
                median = statistics.median(s for s in steady if s is not None)
                result["kinds"][name] = {"first": first, "steady": median}
    return result


def markdown(runs: list[dict[str, dict[str, Any]]], args: argparse.Namespace, took: float) -> str:
    rows = []
    for name, _, _ in KINDS:
        cells = []
        for server in SERVERS:
            ratios = [r[server]["kinds"][name]["first"] / r[server]["kinds"][name]["steady"]
                      for r in runs]  # fmt: skip
            firsts = [r[server]["kinds"][name]["first"] * 1000 for r in runs]
            steadies = [r[server]["kinds"][name]["steady"] * 1000 for r in runs]
            cells += [f"{statistics.median(firsts):.1f}", f"{statistics.median(steadies):.1f}",
                      f"**{statistics.median(ratios):.2f}×**"]  # fmt: skip
        paired = [
            (r["vllm"]["kinds"][name]["first"] / r["vllm"]["kinds"][name]["steady"])
            / (r["llmwarm"]["kinds"][name]["first"] / r["llmwarm"]["kinds"][name]["steady"])
            for r in runs
        ]
        rows.append(f"| {name} | {' | '.join(cells)} | {statistics.median(paired):.2f} |")
    served = {
        s: statistics.median(r[s]["served_after_s"] for r in runs) for s in SERVERS
    }  # fmt: skip
    command = f"python -m benchmarks.lora --model {args.model} --runs {args.runs}"
    return f"""## A LoRA adapter loaded at run time

`{command}` ({datetime.now(timezone.utc):%Y-%m-%d}, this machine: 2 shared CPU cores, {
        took / 60:.0f} min; {args.runs} runs, each starting both servers, the order alternating).
After `POST /v1/load_lora_adapter`, kind after kind: the first request on the adapter that is
answered (llmwarm answers 503 while it warms the adapter; those run nothing), then {
        args.steady
    } more, whose median is the steady latency. Medians over the runs; the last
column is plain vLLM's first-over-steady ratio over llmwarm's, paired by run.

| kind | vLLM first (ms) | vLLM steady (ms) | vLLM first/steady | llmwarm first (ms) | llmwarm steady (ms) | llmwarm first/steady | vLLM ratio / llmwarm ratio |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

From the load call to the first request answered: plain vLLM {served["vllm"]:.2f} s, llmwarm {
        served["llmwarm"]:.2f} s (its adapter warm-up; the base model and other adapters serve
meanwhile).
"""  # noqa: E501


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(".cache/tiny-llama"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steady", type=int, default=10, help="requests after the first")
    parser.add_argument("--docs", type=Path, default=Path(__file__).parent.parent / "docs")
    parser.add_argument("--log", type=Path, default=Path("bench-lora.log"))
    args = parser.parse_args()
    began = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="llmwarm-lora-bench-") as tmp:
        for n in range(args.runs):
            order = SERVERS if n % 2 == 0 else SERVERS[::-1]
            run = {server: one(server, args, Path(tmp) / str(n)) for server in order}
            print(n, {s: run[s]["kinds"] for s in SERVERS}, flush=True)
            runs.append(run)
    body = markdown(runs, args, time.perf_counter() - began)
    print(body)
    write_section(args.docs / "benchmarks.md", "lora", body)


if __name__ == "__main__":
    main()
