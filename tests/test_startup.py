"""The start's stage and its predicted time to ready (`llmwarm.serve.startup`), and the loading
engine's stages as its worker tells them (`llmwarm.backend.loading`)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmwarm.backend import loading
from llmwarm.backend.caches import Manifest
from llmwarm.serve import startup
from llmwarm.serve.state import RunState

T0 = 1000.0  # the process's launch, on the state's clock
EARLIER = startup.Earlier(engine_start_s=30.0, warmup_s=20.0, source="the last start's report")


def state(earlier: startup.Earlier | None = EARLIER) -> RunState:
    s = RunState(window=3, started=T0)
    s.earlier = earlier
    return s


def loading_for(s: RunState, seconds: float, stage: str | None = None) -> float:
    """The engine began starting 2 s after launch; `seconds` into its start, now."""
    s.engine_started = T0 + 2
    if stage is not None:
        s.loading, s.loading_since = stage, T0 + 3
    return T0 + 2 + seconds


def warming(s: RunState, warm: float, done: int, planned: int) -> float:
    s.stage = s.stage.WARMING
    live = s.begin_warmup(3)
    live.started, live.done, live.planned = T0 + 40, done, planned
    live.where = {"bucket": done + 1, "buckets": planned, "name": "p16xc1", "round": 2}
    return T0 + 40 + warm


# --- the prediction ----------------------------------------------------------------------


def test_loading_predicts_the_rest_of_the_last_engine_start_and_its_warm_up() -> None:
    s = state()
    now = loading_for(s, 10, "compiling the model")
    out = startup.status(s, now)
    assert out["phase"] == "loading" and out["elapsed_s"] == 12.0
    assert out["detail"] == "compiling the model" and out["detail_s"] == 9.0
    assert out["expected_ready_in_s"] == 20 + 20  # (30 - 10) of the engine, 20 of warm-up
    assert out["expected_from"] == "the last start's report" and out["warmup_done"] == 0.0


def test_an_engine_slower_than_last_time_still_expects_its_warm_up() -> None:
    s = state()
    assert startup.status(s, loading_for(s, 45))["expected_ready_in_s"] == 20.0


def test_before_the_worker_says_anything_the_detail_is_the_engine_starting() -> None:
    s = state()
    out = startup.status(s, T0 + 1)  # (not even the engine's start yet)
    assert out["detail"].startswith("the engine starts") and "detail_s" not in out
    assert out["expected_ready_in_s"] == 50.0


def test_a_first_start_has_no_prediction_and_says_why() -> None:
    s = state(earlier=None)
    out = startup.status(s, loading_for(s, 5))
    assert out["expected_ready_in_s"] is None
    assert "no earlier start" in out["expected_from"]


def test_a_bake_without_a_warm_up_time_predicts_its_engine_start_only() -> None:
    s = state(startup.Earlier(30.0, None, "the bake's manifest (a cold start)"))
    out = startup.status(s, loading_for(s, 10))
    assert out["expected_ready_in_s"] == 20.0 and "engine start only" in out["expected_from"]


def test_warming_predicts_the_rest_of_the_last_warm_up() -> None:
    s = state()
    out = startup.status(s, warming(s, warm=5, done=1, planned=4))
    assert out["phase"] == "warming" and out["warmup_done"] == 0.25
    assert out["expected_ready_in_s"] == 15.0
    assert out["detail"] == "warming bucket 2 of 4, round 2"
    assert "p16xc1" not in json.dumps(out)  # no key needed: no bucket's name


def test_a_warm_up_past_the_last_one_extrapolates_its_own_progress() -> None:
    s = state()
    out = startup.status(s, warming(s, warm=30, done=3, planned=4))
    assert out["expected_ready_in_s"] == 10.0  # 30 s for 3 of 4 buckets: 10 s more
    assert out["expected_from"] == "this warm-up's progress"


def test_without_a_last_warm_up_nothing_is_predicted_before_a_bucket_is_done() -> None:
    s = state(earlier=None)
    out = startup.status(s, warming(s, warm=3, done=0, planned=4))
    assert out["expected_ready_in_s"] is None and "no bucket" in out["expected_from"]
    s.warmup.where = {"kv_fill": {"blocks": 10, "target": 40}}
    assert startup.status(s, T0 + 44)["detail"] == "filling the KV cache once (10 of 40 blocks)"


def test_ready_expects_nothing_and_keeps_its_time_to_ready() -> None:
    s = state()
    s.stage = s.stage.SERVING
    s.ready_s = 51.25
    out = startup.status(s, T0 + 300)
    assert out["expected_ready_in_s"] == 0.0 and out["ready_s"] == 51.2
    assert out["warmup_done"] == 1.0 and out["phase"] == "ready"


def test_stopping_predicts_nothing() -> None:
    s = state()
    s.stage = s.stage.STOPPING
    out = startup.status(s, T0 + 5)
    assert out["phase"] == "stopping" and out["expected_ready_in_s"] is None


def test_the_first_opening_of_the_gate_is_the_time_to_ready() -> None:
    s = RunState(window=3)
    s.serving()
    first = s.ready_s
    assert first is not None and first >= 0
    s.gate_closed = False
    s.serving()  # (again, after a re-warm)
    assert s.ready_s == first


def test_the_process_start_counts_from_the_launch(tmp_path: Path) -> None:
    # a process that slept before making its state: its start counts the sleep
    code = (
        "import time; time.sleep(0.5); from llmwarm.serve.state import RunState; "
        "print(time.perf_counter() - RunState(window=3).started)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) >= 0.5


# --- what an earlier start took ------------------------------------------------------------


def manifest(warmup_s: float | None) -> Manifest:
    return Manifest(
        llmwarm_version="0", vllm_version="0", model="m", config_hash="h",
        engine_start_s=60.0, warmup_s=warmup_s,
    )  # fmt: skip


def test_the_last_report_says_what_the_last_start_took(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"engine_start_s": 31.5, "warmup_s": 12, "other": [1]}))
    got = startup.earlier(report, manifest(5.0))
    assert got is not None and (got.engine_start_s, got.warmup_s) == (31.5, 12.0)
    assert str(report) in got.source


@pytest.mark.parametrize(
    "content", [None, "{not json", json.dumps({"engine_start_s": "x", "warmup_s": 1}), "[]"]
)
def test_a_missing_or_damaged_report_falls_back_to_the_bake(
    tmp_path: Path, content: str | None
) -> None:
    report = tmp_path / "report.json"
    if content is not None:
        report.write_text(content)
    got = startup.earlier(report, manifest(8.0))
    assert got == startup.Earlier(60.0, 8.0, "the bake's manifest (a cold start)")
    assert startup.earlier(report, None) is None


def test_a_manifest_of_an_older_llmwarm_has_no_warm_up_time() -> None:
    data = manifest(None).model_dump(mode="json")
    del data["warmup_s"]
    assert Manifest.model_validate(data).warmup_s is None


# --- the loading engine's stages -----------------------------------------------------------


def test_every_stage_message_is_in_the_installed_vllm() -> None:
    # vLLM's messages move between releases: each marker must still be logged where vLLM
    # starts its worker (its runners, its compiler, its model loaders)
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin is not None
    root = Path(spec.origin).parent
    parts = ("v1/worker", "compilation", "model_executor/model_loader")
    source = "\n".join(
        p.read_text(errors="replace") for part in parts for p in (root / part).rglob("*.py")
    )
    missing = [marker for marker, _ in loading.STAGES if marker not in source]
    assert not missing


def test_a_message_begins_its_stage() -> None:
    assert loading.stage_of("Starting to load model %s...") == 0
    assert loading.STAGES[loading.stage_of("Warming up model for the compilation...") or 0][1] == (
        "compiling the model"
    )
    assert loading.stage_of("Explicitly set (1.0/23.54) GiB for KV cache on node 0.") is not None
    assert loading.stage_of("Reducing Torch threads from 2 to 1") is None


async def test_the_worker_tells_its_stages_across_processes() -> None:
    heard: list[str] = []
    got = asyncio.Event()

    def on_stage(stage: str) -> None:
        heard.append(stage)
        if len(heard) == 2:
            got.set()

    # as vLLM's spawned worker: another process, with the environment, and vLLM's loggers
    worker = (
        "import logging; logging.getLogger('vllm').setLevel(logging.INFO)\n"
        "from llmwarm.backend import loading; loading.in_worker(); loading.in_worker()\n"
        "log = logging.getLogger('vllm.v1.worker.gpu_model_runner')\n"
        "log.info('Starting to load model %s...', 'm')\n"
        "log.info('unrelated')\n"
        "log.info('Graph capturing finished in %.0f secs, took %.2f GiB', 3, 0.5)\n"
    )
    with loading.listening(on_stage):
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", worker)
        assert await proc.wait() == 0
        await got.wait()
    assert heard == ["loading the weights", "the engine finishes its start"]  # once each
    assert loading.ENV not in os.environ


def test_the_llmwarm_process_does_not_forward_its_own_logs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(loading.ENV, f"{os.getpid()}:/nonexistent")
    loading.in_worker()
    assert not any(isinstance(h, loading._Forward) for h in logging.getLogger("vllm").handlers)
