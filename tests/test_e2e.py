"""End to end: the real `llmwarm` process, the real CPU vLLM engine, the tiny model, real sockets.

One `llmwarm serve` is shared by this module; its shutdown test runs last.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from llmwarm.gate import WARMUP_HEADER
from tests.conftest import ENGINE_FLAGS, LLMWARM, ROOT, engine_env, free_port

pytestmark = pytest.mark.e2e

MINIMAL = ROOT / "llmwarm" / "configs" / "minimal.yaml"
STARTUP_TIMEOUT_S = 400


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    report: Path
    log: Path
    # (path, status, retry-after, JSON body) of every answer seen before /ready was 200
    before_ready: list[tuple[str, int, str | None, dict]] = field(default_factory=list)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _poll_until_ready(served: Served) -> None:
    """Probe like a load balancer (and a forger) until /ready is 200."""
    probes = [
        ("GET", "/ready", {}),
        ("GET", "/health", {}),
        ("GET", "/v1/models", {}),
        ("POST", "/v1/completions", {WARMUP_HEADER: "forged-token"}),
    ]
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    i = 0
    with httpx.Client(base_url=served.url, timeout=10) as client:
        while time.monotonic() < deadline:
            if served.proc.poll() is not None:
                pytest.fail(f"llmwarm exited early:\n{served.log_text()[-3000:]}")
            method, path, headers = probes[i % len(probes)]
            i += 1
            try:
                body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
                r = client.request(method, path, headers=headers, json=body)
            except httpx.TransportError:
                time.sleep(0.2)  # not bound yet (the CLI is still importing vLLM)
                continue
            if r.status_code == 200:
                # The gate opened between probes: /ready must agree (it never closes again).
                assert client.get("/ready").status_code == 200, (path, r.text)
                return
            served.before_ready.append(
                (path, r.status_code, r.headers.get("retry-after"), r.json())
            )
            time.sleep(0.1)
    pytest.fail(f"not ready after {STARTUP_TIMEOUT_S} s:\n{served.log_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("served")
    port = free_port()
    log = tmp / "llmwarm.log"
    cmd = [
        *LLMWARM, "serve", str(tiny_model), *ENGINE_FLAGS,
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny",
        "--profile", str(MINIMAL), "--report", str(tmp / "report.json"),
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=engine_env())
    s = Served(proc=proc, url=f"http://127.0.0.1:{port}", report=tmp / "report.json", log=log)
    try:
        _poll_until_ready(s)
        yield s
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_503_with_retry_after_until_warm(served: Served) -> None:
    seen = served.before_ready
    assert seen, "never saw the server before it was ready"
    for path, status, retry_after, body in seen:
        assert status == 503, (path, status, body)
        assert retry_after is not None and int(retry_after) > 0
        assert body["status"] in ("loading", "warming")
    phases = {body["status"] for *_, body in seen}
    assert "loading" in phases
    paths = {path for path, *_ in seen}
    assert {"/ready", "/health", "/v1/models", "/v1/completions"} <= paths
    warming = [body for *_, body in seen if body["status"] == "warming"]
    for body in warming:
        progress = body.get("progress", {})  # from the end of the first batch on
        if "kv_fill" in progress:
            assert 0 <= progress["kv_fill"]["blocks"] <= progress["kv_fill"]["target"]
        elif progress:
            assert 1 <= progress["bucket"] <= progress["buckets"] == 2
            assert progress["round"] >= 1


def test_ready_reports_the_warmup(served: Served) -> None:
    ready = httpx.get(f"{served.url}/ready").json()
    report = json.loads(served.report.read_text())
    assert ready["status"] == "ready" and ready["model"] == "tiny"
    assert ready["requests"] == report["requests"] > 0
    assert ready["converged"] == report["converged"]
    assert httpx.get(f"{served.url}/health").status_code == 200


def test_report_file(served: Served) -> None:
    report = json.loads(served.report.read_text())
    assert report["version"] == 1 and report["model"] == "tiny"
    assert report["prefix_cache_reset"] is True
    # minimal.yaml prefills 1 % of the engine's KV-cache blocks once, before the buckets
    kv = report["kv_fill"]
    assert kv["blocks"] > 0 and kv["target_blocks"] == int(0.01 * kv["blocks"])
    assert kv["blocks_reached"] >= kv["target_blocks"]
    assert [b["name"] for b in report["buckets"]] == ["p16-c1-o8", "p64-c2-o8"]
    sent = 0
    for bucket in report["buckets"]:
        n = len(bucket["rounds"])
        assert 2 <= n <= 4  # minimal.yaml: min_rounds 2, max_rounds 4
        assert [r["round"] for r in bucket["rounds"]] == list(range(1, n + 1))
        if bucket["converged_at"] is not None:
            assert bucket["converged_at"] == n and bucket["stop_reason"] == "converged"
        else:
            assert n == 4 and bucket["stop_reason"] == "max_rounds"
        for rnd in bucket["rounds"]:
            sent += len(rnd["samples"])
            # minimal.yaml crosses greedy, logprobs and json_schema with the first bucket
            n_kinds = 3 if bucket["name"] == "p16-c1-o8" else 1
            assert len(rnd["samples"]) == n_kinds * 4 * bucket["concurrency"]
            for sample in rnd["samples"]:
                if "json_schema" not in sample["kind"]:  # a schema may end the output early
                    assert sample["output_tokens"] == 8  # ignore_eos: the full decode ran
                assert sample["e2e_s"] > 0
                if "-stream" in sample["kind"]:
                    assert sample["ttft_s"] > 0
                    if sample["output_tokens"] > 1:
                        assert sample["tpot_s"] > 0
    assert report["requests"] == sent
    kinds = {k["kind"] for k in report["kinds"]}
    assert {"completions+logprobs", "chat-stream+json_schema", "chat"} <= kinds
    # the warm-up table was logged
    assert f"llmwarm warm-up: {sent} requests" in served.log_text()


def test_metrics_show_the_warmup_beside_vllms(served: Served) -> None:
    text = httpx.get(f"{served.url}/metrics").text
    assert 'llmwarm_phase{llmwarm_phase="ready"} 1.0' in text
    assert 'llmwarm_bucket_rounds{bucket="p16-c1-o8"}' in text
    assert 'llmwarm_bucket_warm_tpot_seconds{bucket="p64-c2-o8"}' in text
    assert "vllm:num_requests_running" in text  # vLLM's own series, same endpoint


def test_openai_client_completions_chat_and_stream(served: Served) -> None:
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny"]
    done = client.completions.create(model="tiny", prompt="the model", max_tokens=5)
    assert done.usage is not None and done.usage.completion_tokens >= 1
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=5
    )
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text


def test_bench_against_the_warm_server(served: Served, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [*LLMWARM, "bench", served.url, "--repeats", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and report["exact_lengths"] is True  # vLLM's /tokenize
    kinds = {k["kind"]: k for k in report["kinds"]}
    # vLLM serves every probed feature; each kind was timed first and steady
    assert not [k for k in report["kinds"] if k["error"]]
    assert {"completions", "chat-stream+logprobs", "chat+json_schema"} <= set(kinds)
    assert all(k["first_s"] > 0 and k["steady_s"] > 0 for k in report["kinds"])
    assert report["worst_ratio"] >= report["geomean_ratio"] > 0
    assert "first/steady" in proc.stdout


def test_sigterm_shuts_down_and_leaves_no_engine(served: Served) -> None:
    children = psutil.Process(served.proc.pid).children(recursive=True)
    assert children, "expected an EngineCore process"
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(30) == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [p.pid for p in alive]
    assert "Traceback" not in served.log_text()


def test_warm_writes_the_report_and_plot_and_exits(tiny_model: Path, tmp_path: Path) -> None:
    report, plot = tmp_path / "warm.json", tmp_path / "warm.png"
    proc = subprocess.run(
        [*LLMWARM, "warm", str(tiny_model), *ENGINE_FLAGS, "--profile", str(MINIMAL),
         "--report", str(report), "--plot", str(plot)],
        capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S, env=engine_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["requests"] >= 2 * 4 * (1 + 2) and len(data["buckets"]) == 2
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "Traceback" not in proc.stderr


def test_unconverged_with_fail_policy_exits_6_after_writing_the_report(
    tiny_model: Path, tmp_path: Path
) -> None:
    profile = tmp_path / "strict.yaml"
    # No real series is this flat: the rule cannot hold within two rounds.
    profile.write_text(
        "buckets:\n  - {prompt_tokens: 16, concurrency: 1, max_tokens: 8}\n"
        "convergence: {window: 2, spread: 0.000001, min_rounds: 2, max_rounds: 2}\n"
    )
    report = tmp_path / "strict.json"
    proc = subprocess.run(
        [*LLMWARM, "warm", str(tiny_model), *ENGINE_FLAGS, "--profile", str(profile),
         "--report", str(report), "--on-unconverged", "fail"],
        capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S, env=engine_env(),
    )  # fmt: skip
    assert proc.returncode == 6, proc.stderr[-3000:]
    assert "not warm: max_rounds was reached" in proc.stderr
    assert "• bucket p16-c1-o8: did not converge" in proc.stderr
    data = json.loads(report.read_text())
    assert data["converged"] is False and data["on_unconverged"] == "fail"
    assert data["buckets"][0]["stop_reason"] == "max_rounds"
    assert "Traceback" not in proc.stderr


def _engine_children(pid: int) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process(pid).children(recursive=True)
        if "resource_tracker" not in " ".join(p.cmdline())
    ]


@pytest.mark.parametrize("phase", ["loading", "warming"])
def test_sigterm_before_ready_exits_130_and_leaves_no_engine(
    tiny_model: Path, tmp_path: Path, phase: str
) -> None:
    port = free_port()
    log = tmp_path / "log"
    profile = tmp_path / "long.yaml"
    # Enough rounds that the warm-up lasts a while on this machine.
    profile.write_text(
        "buckets:\n  - {prompt_tokens: 64, concurrency: 2, max_tokens: 32}\n"
        "convergence: {spread: 0.000001, max_rounds: 200}\n"
    )
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*LLMWARM, "serve", str(tiny_model), *ENGINE_FLAGS, "--port", str(port),
             "--host", "127.0.0.1", "--profile", str(profile),
             "--report", str(tmp_path / "r.json")],
            stdout=out, stderr=subprocess.STDOUT, env=engine_env(),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            while time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    status = client.get("/ready").json()["status"]
                except httpx.TransportError:
                    status = None
                # "loading" counts once the engine process exists, so its shutdown is tested
                if status == phase and (phase != "loading" or _engine_children(proc.pid)):
                    break
                time.sleep(0.2)
            else:
                pytest.fail(f"never saw {phase}:\n{log.read_text()[-3000:]}")
        children = _engine_children(proc.pid)
        assert children
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 130
        assert time.monotonic() - t0 < 15
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive
        text = log.read_text()
        assert f"interrupted while {phase}" in text and "Traceback" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
