"""What coverage costs a request: the gate with coverage on against off, side by side in one run.

Two measurements, each interleaving on and off request by request (so drift on a noisy host
hits both alike):

* **over HTTP**: a server process runs two gates on two ports, one recording coverage and one
  not, each in front of the same stand-in of vLLM's app (answers in vLLM's wire format: a chat
  stream of 16 chunks with usage, a unary completion). A client sends the same requests to both
  in turn and times each as a user would (median, p99).
* **in process**: the gate called directly as an ASGI app, no socket, so what it adds is not
  lost in the HTTP round trip: its own time per request, on and off, and the post-answer
  classification and record alone.

The stand-in app isolates llmwarm's cost: what vLLM does with the request is the same with
coverage on or off. Writes the `coverage` section of docs/benchmarks.md.

    python -m benchmarks.coverage --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from starlette.types import Receive, Scope, Send

from benchmarks.launch import ROOT, free_port
from benchmarks.pages import write_section

PROMPT = " ".join(f"word{i}" for i in range(400))  # ~2 KB of text, as a real prompt
CHAT = {
    "model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16,
    "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.7,
    "logprobs": True, "top_logprobs": 2,
}  # fmt: skip
COMPLETION = {"model": "m", "prompt": PROMPT, "max_tokens": 16}
USAGE = {"prompt_tokens": 812, "completion_tokens": 16, "total_tokens": 828}


async def vllm_like(scope: Scope, receive: Receive, send: Send) -> None:
    """vLLM's answers, byte for byte in shape: a chat stream, or a unary completion."""
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/v1/chat/completions":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        for i in range(16):
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m",
                     "choices": [{"index": 0, "delta": {"content": f" tok{i}"}}]}  # fmt: skip
            await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n"
                        .encode(), "more_body": True})  # fmt: skip
        last = {"id": "chatcmpl-1", "choices": [], "usage": USAGE}
        await send({"type": "http.response.body", "more_body": True,
                    "body": f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode()})  # fmt: skip
        await send({"type": "http.response.body", "body": b""})
        return
    body = json.dumps({"id": "cmpl-1", "object": "text_completion", "model": "m",
                       "choices": [{"index": 0, "text": " tok" * 16, "finish_reason": "length"}],
                       "usage": USAGE}).encode()  # fmt: skip
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def gates() -> tuple[Any, Any]:
    from llmwarm.model.kinds import Kind
    from llmwarm.serve.gate import Gate
    from llmwarm.serve.state import RunState
    from llmwarm.traffic.coverage import Warmed

    made = []
    for on in (True, False):
        state = RunState(window=3)
        state.warming(vllm_like)
        state.serving()
        state.coverage.served = frozenset({"m"})
        warmed = [Kind.parse("chat-stream"), Kind("completions")]
        state.coverage.warmed_more(Warmed.of([(64, 2, warmed)]))
        made.append(Gate(state, coverage=on))
    return made[0], made[1]


async def serve(ports: tuple[int, int]) -> None:
    import uvicorn

    on, off = gates()
    servers = [
        uvicorn.Server(uvicorn.Config(gate, host="127.0.0.1", port=port, log_level="warning",
                                      access_log=False, lifespan="off"))
        for gate, port in zip((on, off), ports, strict=True)
    ]  # fmt: skip
    await asyncio.gather(*(s.serve() for s in servers))


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[int(0.99 * (len(ordered) - 1))] * 1000,
    }


def over_http(requests: int, ports: tuple[int, int]) -> dict[str, dict[str, dict[str, float]]]:
    times: dict[str, dict[str, list[float]]] = {
        kind: {"on": [], "off": []} for kind in ("chat-stream", "completions")
    }
    clients = {mode: httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
               for mode, port in zip(("on", "off"), ports, strict=True)}  # fmt: skip
    with clients["on"], clients["off"]:
        for i in range(requests + 50):
            for mode in ("on", "off") if i % 2 else ("off", "on"):  # who goes first alternates
                client = clients[mode]
                start = time.perf_counter()
                with client.stream("POST", "/v1/chat/completions", json=CHAT) as answer:
                    answer.read()
                chat = time.perf_counter() - start
                start = time.perf_counter()
                client.post("/v1/completions", json=COMPLETION).raise_for_status()
                completion = time.perf_counter() - start
                if i >= 50:  # the first 50 warm the connections up
                    times["chat-stream"][mode].append(chat)
                    times["completions"][mode].append(completion)
    return {kind: {m: _stats(v) for m, v in modes.items()} for kind, modes in times.items()}


async def in_process(requests: int) -> dict[str, Any]:
    """The gate as an ASGI call (no socket), on and off interleaved; and classify + record."""
    from llmwarm.traffic.skeleton import Skeleton

    on, off = gates()
    bodies = {"/v1/chat/completions": json.dumps(CHAT).encode(),
              "/v1/completions": json.dumps(COMPLETION).encode()}  # fmt: skip
    times: dict[str, list[float]] = {"on": [], "off": []}

    async def call(gate: Any, path: str) -> float:
        messages = [{"type": "http.request", "body": bodies[path], "more_body": False}]

        async def receive() -> dict[str, Any]:
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            return None

        scope = {"type": "http", "method": "POST", "path": path, "headers": [],
                 "client": ("10.0.0.1", 5000), "server": ("10.0.0.2", 8000)}  # fmt: skip
        start = time.perf_counter()
        await gate(scope, receive, send)
        return time.perf_counter() - start

    for i in range(requests + 200):
        for path in bodies:
            for mode, gate in (("on", on), ("off", off)) if i % 2 else (("off", off), ("on", on)):
                took = await call(gate, path)
                if i >= 200:
                    times[mode].append(took)
    # the classification and record alone (what runs once the answer is out)
    coverage = on.state.coverage
    tail = json.dumps({"choices": [], "usage": USAGE}).encode()
    record: list[float] = []
    for _ in range(requests):
        start = time.perf_counter()
        body = Skeleton()
        body.feed(bodies["/v1/chat/completions"])
        shape = coverage.classify("chat", body.parse(), tail, 1)
        assert shape is not None
        coverage.record(shape, 0.01)
        record.append(time.perf_counter() - start)
    return {
        "on": _stats(times["on"]),
        "off": _stats(times["off"]),
        "added_median_ms": _stats(times["on"])["median_ms"] - _stats(times["off"])["median_ms"],
        "added_p99_ms": (_stats(times["on"])["p99_ms"] - _stats(times["off"])["p99_ms"]),
        "classify_record": _stats(record),
    }


def markdown(http: dict[str, Any], local: dict[str, Any], args: argparse.Namespace) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## What coverage costs a request (`benchmarks/coverage.py`)",
        "",
        f"Measured {when} on this machine (2 cores, shared), {args.requests} requests per kind "
        "and mode, coverage on and off interleaved request by request in one run. The gate "
        "fronts a stand-in of vLLM's app (its wire format: a chat stream of 16 chunks with "
        "usage, a unary completion; ~2 KB prompts), so only llmwarm's own cost differs.",
        "",
        "Over HTTP (a client timing each request, as a user would):",
        "",
        "| kind | off: median | on: median | on / off | off: p99 | on: p99 | on / off |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, modes in http.items():
        off, on = modes["off"], modes["on"]
        lines.append(
            f"| {kind} | {off['median_ms']:.3f} ms | {on['median_ms']:.3f} ms | "
            f"{on['median_ms'] / off['median_ms']:.3f}× | {off['p99_ms']:.3f} ms | "
            f"{on['p99_ms']:.3f} ms | {on['p99_ms'] / off['p99_ms']:.3f}× |"
        )
    lines += [
        "",
        "In process (the gate called as an ASGI app, no socket; both kinds):",
        "",
        "| | median | p99 |",
        "|---|---|---|",
        f"| coverage off | {local['off']['median_ms'] * 1000:.1f} µs | "
        f"{local['off']['p99_ms'] * 1000:.1f} µs |",
        f"| coverage on | {local['on']['median_ms'] * 1000:.1f} µs | "
        f"{local['on']['p99_ms'] * 1000:.1f} µs |",
        f"| added per request (on − off) | {local['added_median_ms'] * 1000:.1f} µs | "
        f"{local['added_p99_ms'] * 1000:.1f} µs |",
        f"| of which classify + record, as the answer ends | "
        f"{local['classify_record']['median_ms'] * 1000:.1f} µs | "
        f"{local['classify_record']['p99_ms'] * 1000:.1f} µs |",
        "",
        "Target (#14): within noise, and under 0.2 ms a request.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--serve", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(tuple(args.serve)))
        return
    ports = (free_port(), free_port())
    server = subprocess.Popen([sys.executable, __file__, "--serve", *map(str, ports)])
    try:
        for port in ports:
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/live", timeout=1)
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
        http = over_http(args.requests, ports)
    finally:
        server.terminate()
        server.wait(10)
    local = asyncio.run(in_process(args.requests))
    body = markdown(http, local, args)
    print(body)
    write_section(args.docs / "benchmarks.md", "coverage", body)


if __name__ == "__main__":
    main()
