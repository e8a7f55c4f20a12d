"""A fleet behind a real load balancer: a rolling restart and a scale-out, llmwarm against
plain vLLM, each under the same steady open-loop load.

Envoy in front of replicas of one model on loopback (`fleet.py` says how it is set up: active
health checks on `/ready` for llmwarm, on `/health` for plain vLLM, as llm-d, KServe and
vLLM's production-stack chart probe it; no new host routed before its first check passes;
retries on another host; outlier detection). The endpoints are a file Envoy watches, written
as Kubernetes' endpoints controller would: a replica is listed once its process starts (the
health check decides when it is routed to) and delisted, then SIGTERMed after a 2 s preStop,
when it is replaced. For each server, in turn:

  rolling restart   2 replicas serving; twice: start a new one, wait until Envoy routes to it,
                    delist and SIGTERM an old one (it drains), as `maxSurge: 1,
                    maxUnavailable: 0` does
  scale-out         1 replica serving; start a second

under Poisson arrivals at `--rate` of a mix of request kinds (completions and chat, streamed
and not, logprobs; fresh prompts), bounded in count and time. Per server it counts failed
requests (not 2xx, or no answer), the requests each new replica served in its first
`--cold-window` seconds against its own later requests of the same kind (cold-served: TTFT
for streams, end to end otherwise; the next replica starts only after that window, and a later
request sent while another replica loads, on the cores they share, is left out), and the
p50/p99 TTFT during the rollout against before it. Writes docs/fleet.md (the `fleet-bench`
section) and docs/fleet-timeline.png.

    python -m benchmarks.fleet --rate 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from benchmarks.launch import ROOT
from benchmarks.localfleet import PROBES, Envoy, Replica
from benchmarks.pages import write_section

KINDS: dict[str, tuple[str, dict[str, Any], bool]] = {  # name: (path, body fields, streamed)
    "completions": ("/v1/completions", {}, False),
    "completions-stream": ("/v1/completions", {"stream": True}, True),
    "chat-stream": ("/v1/chat/completions", {"stream": True}, True),
    "chat+logprobs": ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 2}, False),
}
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()


@dataclass
class Result:
    kind: str
    sent: float  # monotonic
    status: int | None = None  # None: no answer (reset, refused)
    first: float | None = None  # the first streamed byte
    end: float | None = None
    upstream: str = ""
    error: str = ""

    @property
    def latency(self) -> float | None:
        """TTFT for a stream, end to end otherwise."""
        done = self.first if KINDS[self.kind][2] else self.end
        return None if done is None else done - self.sent

    @property
    def failed(self) -> bool:
        return self.status is None or not 200 <= self.status < 300


@dataclass
class Run:
    server: str
    scenario: str
    results: list[Result] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    replicas: list[Replica] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)
    rollout: tuple[float, float] = (0.0, 0.0)  # when the change began and ended
    # while a replica loads and warms, it takes the cores the others serve on (2 here):
    # a serving replica's requests then are not its steady state
    loading: list[tuple[float, float]] = field(default_factory=list)

    def busy(self, at: float) -> bool:
        return any(start <= at <= end for start, end in self.loading)

    def event(self, label: str) -> None:
        print(f"{self.server} {self.scenario} +{time.monotonic() - self.t0:.0f}s {label}",
              flush=True)  # fmt: skip
        self.events.append((time.monotonic(), label))


async def _one(client: httpx.AsyncClient, kind: str, rng: random.Random) -> Result:
    path, extra, stream = KINDS[kind]
    text = " ".join(rng.choices(WORDS, k=48))
    body: dict[str, Any] = {"model": "fleet", "max_tokens": 16, "ignore_eos": True, **extra}
    if path.endswith("/chat/completions"):
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    result = Result(kind, time.monotonic())
    try:
        async with client.stream("POST", path, json=body) as answer:
            result.status, result.upstream = (
                answer.status_code,
                answer.headers.get("x-upstream", ""),
            )
            async for _ in answer.aiter_bytes():
                result.first = result.first or time.monotonic()
        result.end = time.monotonic()
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _done(task: asyncio.Task[Result], tasks: set[Any], results: list[Result]) -> None:
    tasks.discard(task)
    results.append(task.result())


async def load(url: str, run: Run, rate: float, stop: asyncio.Event, limit: int) -> None:
    """Poisson arrivals at `rate` a second until `stop` (or `limit` requests)."""
    rng = random.Random(7)
    tasks: set[asyncio.Task[Result]] = set()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(
            max_connections=None, max_keepalive_connections=None)) as client:  # fmt: skip
        with contextlib.suppress(httpx.HTTPError):
            await client.get("/_warm_the_client")  # its first request costs ~20 ms
        while not stop.is_set() and len(run.results) + len(tasks) < limit:
            task = asyncio.create_task(_one(client, rng.choice(list(KINDS)), rng))
            tasks.add(task)
            task.add_done_callback(lambda t: _done(t, tasks, run.results))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.expovariate(rate))
        if tasks:
            await asyncio.wait(tasks)


async def _until(check: Any, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {what}")
        await asyncio.sleep(0.2)


async def scenario(name: str, server: str, args: argparse.Namespace, workdir: Path) -> Run:
    run = Run(server, name)
    envoy = Envoy(workdir, PROBES[server])
    envoy.start()
    count = 2 if name == "rolling" else 1
    fleet = [Replica(server, args.model, workdir, core=i % 2, n=i) for i in range(count)]
    try:
        for replica in fleet:
            replica.start()
        envoy.set_endpoints([r.port for r in fleet])
        await _until(lambda: {r.port for r in fleet} <= envoy.healthy(), "the first replicas")
        for replica in fleet:
            replica.routable = time.monotonic()
        run.replicas += fleet
        stop = asyncio.Event()
        loading = asyncio.create_task(load(envoy.url, run, args.rate, stop, args.max_requests))
        await asyncio.sleep(args.settle)  # before: steady load on a steady fleet
        run.rollout = (time.monotonic(), 0.0)
        for step in range(count if name == "rolling" else 1):
            if step:  # the last new replica's cold window with no other replica loading
                clear = fleet[-1].routable + args.cold_window
                await asyncio.sleep(max(0.0, clear - time.monotonic()))
            # off the core of the replica that leaves next (in a rolling restart): a new
            # replica's first requests must not share a core with the old one's drain and
            # exit, which a fleet's pods never do (the scale-out's other core is free)
            core = 1 - fleet[0].core
            new = Replica(server, args.model, workdir, core=core, n=count + step)
            run.replicas.append(new)
            new.start()
            started = time.monotonic()
            run.event(f"{new.name} started")
            envoy.set_endpoints([r.port for r in fleet + [new]])
            await _until(lambda n=new: n.port in envoy.healthy(), f"{new.name} routable")
            new.routable = time.monotonic()
            run.loading.append((started, new.routable))
            run.event(f"{new.name} routable")
            if name == "rolling":
                old = fleet.pop(0)
                envoy.set_endpoints([r.port for r in fleet + [new]])
                await asyncio.sleep(2)  # preStop: the endpoint's removal reaches the proxy
                run.event(f"{old.name} SIGTERM")
                code = await asyncio.to_thread(old.terminate)
                run.event(f"{old.name} exited {code}")
            fleet.append(new)
        run.rollout = (run.rollout[0], time.monotonic())
        await asyncio.sleep(args.after)  # the new replicas' later requests
        stop.set()
        await loading
    finally:
        for replica in run.replicas:
            if replica.proc is not None and replica.proc.poll() is None:
                await asyncio.to_thread(replica.terminate)
        envoy.stop()
    return run


def _latencies(results: Iterable[Result]) -> list[float]:
    return [r.latency for r in results if r.latency is not None]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _p(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def analyse(run: Run, cold_window: float) -> dict[str, Any]:
    """Failures, cold-served requests and TTFT before and during the rollout."""
    start, end = run.rollout
    streamed = [r for r in run.results if KINDS[r.kind][2]]
    before = _latencies(r for r in streamed if r.sent < start)
    during = _latencies(r for r in streamed if start <= r.sent <= end)
    ratios: dict[str, float] = {}
    cold_count = 0
    for replica in run.replicas:
        if replica.routable < start:  # a replica of the fleet before the change
            continue
        served = [r for r in run.results if r.upstream.endswith(f":{replica.port}")
                  and not r.failed]  # fmt: skip
        for kind in KINDS:
            mine = [r for r in served if r.kind == kind]
            cold = _latencies(r for r in mine if r.sent < replica.routable + cold_window)
            later = _latencies(
                r for r in mine if r.sent >= replica.routable + cold_window and not run.busy(r.sent)
            )
            cold_count += len(cold)
            if cold and later:
                ratios[f"{replica.name} {kind}"] = statistics.median(cold) / statistics.median(
                    later
                )
    failed = [r for r in run.results if r.failed]
    return {
        "requests": len(run.results),
        "failed": len(failed),
        "failures": sorted({f"{r.status} {r.error[:80]}" for r in failed})[:5],
        "cold_served": cold_count,
        "cold_ratio_worst": max(ratios.values(), default=None),
        "cold_ratio_geomean": math.exp(statistics.fmean(map(math.log, ratios.values())))
        if ratios
        else None,
        "cold_ratios": ratios,
        "ttft_before": {"p50": _median(before), "p99": _p(before, 0.99)},
        "ttft_during": {"p50": _median(during), "p99": _p(during, 0.99)},
        "rollout_s": end - start,
    }


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(12, 3.2 * len(runs)), squeeze=False,
                             constrained_layout=True)  # fmt: skip
    for ax, run in zip(axes[:, 0], runs, strict=True):
        by_host: dict[str, list[Result]] = {}
        for r in run.results:
            by_host.setdefault(r.upstream or "none", []).append(r)
        names = {f"127.0.0.1:{rep.port}": rep.name for rep in run.replicas}
        for host, rs in sorted(by_host.items()):
            ok = [r for r in rs if not r.failed and r.latency is not None]
            ax.scatter([r.sent - run.t0 for r in ok], [1000 * r.latency for r in ok],  # type: ignore[operator]
                       s=6, label=names.get(host, host))  # fmt: skip
        bad = [r for r in run.results if r.failed]
        ax.scatter([r.sent - run.t0 for r in bad], [1] * len(bad), marker="x", color="red",
                   s=30, label=f"failed ({len(bad)})")  # fmt: skip
        for when, label in run.events:
            ax.axvline(when - run.t0, color="grey", linewidth=0.8, linestyle="--")
            ax.text(when - run.t0, 1, label, rotation=90, fontsize=6, va="bottom")
        ax.set_yscale("log")
        ax.set_ylabel("TTFT / e2e, ms")
        ax.set_title(f"{run.server}: {run.scenario}")
        ax.legend(fontsize=6, loc="upper left", markerscale=2)
    axes[-1, 0].set_xlabel("seconds")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.0f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"


def markdown(results: dict[tuple[str, str], dict[str, Any]], args: argparse.Namespace) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## A rolling restart and a scale-out behind Envoy (`benchmarks/fleet.py`)", "",
        f"Measured {when} on this machine (2 cores, shared, vLLM CPU, the tiny model; replicas "
        "pinned to a core each, a new one on the core the replica it replaces is not on, so "
        "its first requests do not share a core with the old one's drain and exit): "
        "`python -m benchmarks.fleet --rate "
        f"{args.rate:g}`. Poisson arrivals at {args.rate:g} requests/s through Envoy, a mix of "
        f"{', '.join(KINDS)}; cold-served: a new replica's requests in its first "
        f"{args.cold_window:g} s after Envoy first routed to it, against its own later ones of "
        "the same kind (TTFT for streams, end to end otherwise; none sent while another "
        "replica loads on the shared cores). The plot is "
        "[fleet-timeline.png](fleet-timeline.png).", "",
    ]  # fmt: skip
    for scenario in args.scenarios:
        lines += [f"**{scenario}**", "",
                  "| | " + " | ".join(args.servers) + " | target (llmwarm) |",
                  "|---|" + "---|" * len(args.servers) + "---|"]  # fmt: skip
        rows: list[tuple[str, Callable[[dict[str, Any]], str], str]] = [
            ("requests", lambda a: str(a["requests"]), ""),
            ("failed (not 2xx, or no answer)", lambda a: str(a["failed"]), "0"),
            ("served by a new replica in its first seconds", lambda a: str(a["cold_served"]), ""),
            ("… their latency / its later ones, worst kind", lambda a: _x(a["cold_ratio_worst"]),
             "≤ 1.2×"),
            ("… geometric mean over kinds", lambda a: _x(a["cold_ratio_geomean"]), ""),
            ("TTFT p50 before → during the rollout, ms", lambda a:
             f"{_ms(a['ttft_before']['p50'])} → {_ms(a['ttft_during']['p50'])}", ""),
            ("TTFT p99 before → during, ms", lambda a:
             f"{_ms(a['ttft_before']['p99'])} → {_ms(a['ttft_during']['p99'])}", "≤ 1.2×"),
            ("rollout, s", lambda a: f"{a['rollout_s']:.0f}", ""),
        ]  # fmt: skip
        for label, cell, target in rows:
            cells = [cell(results[(s, scenario)]) for s in args.servers]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {target} |")
        lines.append("")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    runs, results = [], {}
    for scenario_name in args.scenarios:
        for server in args.servers:
            with tempfile.TemporaryDirectory(prefix="llmwarm-fleet-") as workdir:
                run = await scenario(scenario_name, server, args, Path(workdir))
            runs.append(run)
            results[(server, scenario_name)] = analyse(run, args.cold_window)
            print(server, scenario_name, results[(server, scenario_name)], flush=True)
    body = markdown(results, args)
    print(body)
    plot(runs, args.docs / "fleet-timeline.png")
    write_section(args.docs / "fleet.md", "fleet-bench", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / ".cache" / "tiny-llama"))
    parser.add_argument("--rate", type=float, default=2.0, help="requests a second (Poisson)")
    parser.add_argument("--settle", type=float, default=30, help="seconds of load before")
    parser.add_argument("--after", type=float, default=45, help="seconds of load after")
    parser.add_argument("--cold-window", type=float, default=10)
    parser.add_argument("--max-requests", type=int, default=5000)
    parser.add_argument("--servers", nargs="+", default=["llmwarm", "vllm"])
    parser.add_argument("--scenarios", nargs="+", default=["rolling", "scale-out"])
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
