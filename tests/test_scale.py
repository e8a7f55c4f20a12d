"""End to end at width: a bucket wider than any HTTP pool default really in flight in vLLM, and
a multi-process engine (tensor parallel) warmed, served and stopped with no worker left."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest

from benchmarks.launch import ENGINE_FLAGS, LLMWARM
from tests.launch import STARTUP_TIMEOUT_S, Launch, engine_env, engine_processes, serving

pytestmark = pytest.mark.e2e

RUNNING = re.compile(r"^vllm:num_requests_running\{[^}]*\} ([0-9.e+]+)$", re.MULTILINE)


def test_a_bucket_of_192_has_them_running_at_once_in_vllm(tiny_model: Path, tmp_path: Path) -> None:
    profile = tmp_path / "wide.yaml"
    profile.write_text(
        "endpoints: [completions]\nstream: [true]\n"
        "buckets:\n  - {prompt_tokens: 16, concurrency: 192, max_tokens: 128}\n"
        "convergence: {metric: e2e, window: 2, spread: 10, min_rounds: 2, max_rounds: 2}\n"
    )
    log, report = tmp_path / "log", tmp_path / "report.json"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*LLMWARM, "warm", str(tiny_model), *ENGINE_FLAGS, "--max-num-seqs", "256",
             "--profile", str(profile), "--report", str(report)],
            stdout=out, stderr=subprocess.STDOUT, env=engine_env(), start_new_session=True,
        )  # fmt: skip
    # `warm` listens on a private loopback port (its log names it): read vLLM's own gauge
    # there, as a scraper would
    most = 0.0
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        url = None
        while proc.poll() is None and time.monotonic() < deadline:
            if url is None:
                found = re.search(r"listening on (http://\S+)", log.read_text(errors="replace"))
                url = found.group(1) if found else None
            else:
                try:
                    text = httpx.get(f"{url}/metrics", timeout=5).text
                except httpx.HTTPError:
                    text = ""
                most = max([most, *(float(v) for v in RUNNING.findall(text))])
            time.sleep(0.2)
        assert proc.wait() == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    data = report.read_text()
    assert '"max_in_flight": 192' in data, data[:2000]
    # vLLM itself had at least 150 of them running at once (httpx's default pool: 100), by
    # its gauge on /metrics and by its scheduler's stats in the report
    assert most >= 150, most
    [bucket] = json.loads(data)["buckets"]
    assert bucket["max_running"] >= max(150, most), bucket


def test_tensor_parallel_2_warms_serves_and_leaves_no_worker(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # vLLM's CPU build needs one OpenMP core list per rank here (2 cores, one NUMA node)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    flags = ("--tensor-parallel-size", "2")
    with serving(tiny_model, tmp_path, *flags) as (proc, client, report):
        engine_procs = engine_processes(Launch.of(proc.pid))
        # the EngineCore and a worker per rank
        assert len(engine_procs) >= 3, [p.cmdline() for p in engine_procs]
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
        assert client.post("/v1/completions", json=body).status_code == 200
        # the warm-up finished on the two ranks: every round of every bucket measured a TPOT,
        # and each bucket ended by the rule (`"converged"` in the text was true either way)
        data = json.loads(report.read_text())
        assert data["error"] is None and data["trigger"] == "startup"
        for bucket in data["buckets"]:
            assert bucket["stop_reason"] in ("converged", "max_rounds"), bucket["name"]
            assert all(r["tpot_median_s"] for r in bucket["rounds"]), bucket["name"]
        assert data["converged"] is all(b["converged_at"] for b in data["buckets"])
        assert client.get("/ready").json()["converged"] is data["converged"]
    # serving() SIGTERMed it and saw exit 0: every engine process is gone
    psutil.wait_procs(engine_procs)  # each ends (one left behind: the test's timeout)


def test_tensor_parallel_without_core_lists_is_exit_3_saying_what_to_set(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    done = subprocess.run(
        [*LLMWARM, "warm", str(tiny_model), *ENGINE_FLAGS, "--tensor-parallel-size", "2",
         "--report", str(tmp_path / "report.json")],
        capture_output=True, text=True, env=engine_env(bind=False),
    )  # fmt: skip
    assert done.returncode == 3, done.stderr[-3000:]
    assert "• VLLM_CPU_OMP_THREADS_BIND: with 2 ranks" in done.stderr
    assert "VLLM_CPU_OMP_THREADS_BIND='0|1'" in done.stderr
