"""The learn file: kept across restarts, never lost, and a profile extended from it."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from llmwarm.cli import app
from llmwarm.model import endpoints
from llmwarm.model.fit import EngineShape, for_engine
from llmwarm.model.profile import load_profile, parse_profile
from llmwarm.traffic import learn
from llmwarm.traffic.coverage import Shape, Warmed
from tests.fakes import MINIMAL_PROFILE
from tests.fakes import shape as _shape
from tests.launch import serving

ENGINE = EngineShape(
    max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=512,
    endpoints=frozenset(endpoints.GENERATE),
)  # fmt: skip
PENALTIES = _shape("chat-stream+penalties", 512, 1, 16)
WIDE = _shape("completions", 16, 8, 8)


def test_a_learn_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "learned.json"
    assert learn.read(path) == learn.History(Counter(), Counter(), True, 1)  # none yet
    learn.write(path, Counter({PENALTIES: 3, WIDE: 1}), "tiny")
    counts = Counter({PENALTIES: 3, WIDE: 1})
    assert learn.read(path) == learn.History(counts, counts, True, 1)
    data = json.loads(path.read_text())
    assert data["model"] == "tiny" and data["shapes"][0]["requests"] == 3


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"version": 2, "model": "m", "updated_at": "2026-01-01T00:00:00Z", '
     b'"shapes": []}', b"\xff\xfe bytes", b'{"version": 1, "model": "m", "updated_at": '
     b'"2026-01-01T00:00:00Z", "shapes": [{"endpoint": "chat", "stream": true, '
     b'"features": ["telepathy"], "prompt_tokens": 16, "concurrency": 1, "max_tokens": 8, '
     b'"requests": 1}]}'],
    ids=["not-json", "other-version", "not-utf8", "unknown-feature"],
)  # fmt: skip
def test_a_bad_learn_file_is_set_aside_with_a_warning_never_lost(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "learned.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="llmwarm"):
        assert learn.read(path) == learn.History(Counter(), Counter(), True, 1)
    [aside] = tmp_path.glob("learned.json.bad-*")
    assert aside.read_bytes() == content and not path.exists()
    assert str(path) in caplog.text and str(aside) in caplog.text


def test_a_fleets_learn_directory_is_read_whole_and_written_a_file_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The defects: every replica wrote the same learned.json every minute (the last writer
    # won); then a file per hostname, so a pod name's every restart added one, none was ever
    # pruned, pods sharing a hostname overwrote each other, and another writer's temporary
    # file (`.NAME.json.HEX.json`) was read as a learn file.
    monkeypatch.setattr("socket.gethostname", lambda: "llmwarm-7d9f-abc12")
    learn.write(tmp_path / "pod-a-1111.json", Counter({PENALTIES: 30}), "tiny")  # alive
    held = os.open(tmp_path / ".pod-a-1111.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)  # as its process holds it
    learn.write(tmp_path / "pod-b-2222.json", Counter({WIDE: 2}), "tiny")  # gone: lock free
    (tmp_path / ".pod-b-2222.lock").touch()
    learn.write(tmp_path / "llmwarm-7d9f-xyz34.json", Counter({WIDE: 1}), "tiny")  # no lock
    (tmp_path / "llmwarm-old.json").write_text("{not json")  # gone and bad: set aside
    (tmp_path / ".pod-a-1111.json.ab12cd34.json").write_text('{"half": ')  # being written
    try:
        with caplog.at_level(logging.WARNING, logger="llmwarm"):
            read = learn.read(tmp_path)
    finally:
        os.close(held)
    assert read.counts == Counter({PENALTIES: 30, WIDE: 3}) and read.files == 3
    assert read.own == Counter() and read.writable
    # the files of processes gone are one file now; the living one's and the half-written
    # one are as they were
    finished = sorted(p.name for p in tmp_path.glob("*.json") if not p.name.startswith("."))
    assert finished == ["merged.json", "pod-a-1111.json"]
    assert learn.read(tmp_path / "merged.json").counts == Counter({WIDE: 3})
    assert (tmp_path / ".pod-a-1111.json.ab12cd34.json").exists()
    assert "llmwarm-old.json" in caplog.text and ".ab12cd34" not in caplog.text
    assert [p.name for p in tmp_path.glob("llmwarm-old.json.bad-*")]
    # a name of this process's own, after its host: two processes on one host never share one
    own = learn.own_file(tmp_path)
    assert own.parent == tmp_path and own.name.startswith("llmwarm-7d9f-abc12-")
    other = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from llmwarm.traffic import learn; print(learn.own_file(Path(sys.argv[1])).name)",
         str(tmp_path)],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert other.endswith(".json") and other != own.name
    assert learn.size_classes(tmp_path) == Counter({(512, 1): 30, (16, 8): 3})


def test_the_profile_learns_the_shapes_it_would_miss() -> None:
    profile = for_engine(load_profile(MINIMAL_PROFILE), ENGINE)
    covered = _shape("completions-stream", 16, 1, 8)
    counts = Counter({PENALTIES: 5, WIDE: 2, covered: 50})
    assert Warmed.from_profile(profile).misses(covered) == []
    extended, learned = learn.extend(profile, counts, ENGINE, "learned.json")
    assert learned is not None and learned.file == "learned.json"
    assert learned.buckets == ["learned-p512-c1-o16", "learned-p16-c8-o8"]  # most requests first
    assert "chat-stream+penalties" in learned.kinds
    warmed = Warmed.from_profile(extended)
    assert warmed.misses(PENALTIES) == [] and warmed.misses(WIDE) == []
    # the learned buckets run after the profile's own, so a tight budget cuts them first
    assert [b.name for b in extended.buckets][:2] == [b.name for b in profile.buckets]
    # and nothing to learn: the profile as it was
    assert learn.extend(extended, counts, ENGINE, "x") == (extended, None)


def test_a_shape_the_engine_cannot_take_is_left_out() -> None:
    profile = for_engine(load_profile(MINIMAL_PROFILE), ENGINE)
    adapter = _shape("chat+lora:gone", 16, 1, 8)  # no LoRA on this engine
    extended, learned = learn.extend(profile, Counter({adapter: 9}), ENGINE, "f")
    assert learned is None and extended == profile


def test_at_most_a_few_buckets_are_learned() -> None:
    profile = for_engine(load_profile(MINIMAL_PROFILE), ENGINE)
    names = ["sampling", "penalties", "n", "stop", "json_object", "regex"]
    # most requested first, each longer than the last: every one needs a bucket of its own
    many = Counter({_shape("completions", 128 << i, 1, 8): 10 - i
                    for i, f in enumerate(names)})  # fmt: skip
    _, learned = learn.extend(profile, many, ENGINE, "f")
    assert learned is not None and len(learned.buckets) == learn.MAX_LEARNED_BUCKETS


def test_a_learned_prompt_is_clamped_to_the_engine(tmp_path: Path) -> None:
    long = _shape("completions", 1024, 1, 16)  # served, so at most max_model_len
    profile = for_engine(load_profile(MINIMAL_PROFILE), ENGINE)
    extended, learned = learn.extend(profile, Counter({long: 1}), ENGINE, "f")
    assert learned is not None
    [added] = [b for b in extended.buckets if b.name in learned.buckets]
    assert added.prompt_tokens + added.max_tokens <= ENGINE.max_model_len
    assert Warmed.from_profile(extended).misses(long) == []


def _write(path: Path, counts: Counter[Shape]) -> Path:
    learn.write(path, counts, "tiny")
    return path


def test_from_coverage_merges_the_files_of_a_fleet(tmp_path: Path) -> None:
    one = _write(tmp_path / "a.json", Counter({PENALTIES: 30, WIDE: 1}))
    two = _write(
        tmp_path / "b.json", Counter({PENALTIES: 10, _shape("chat+lora:sql", 16, 1, 8): 60})
    )
    result = CliRunner().invoke(app, ["profile", "from-coverage", str(one), str(two),
                                      "--coverage", "0.9"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "from 2 learn files: 101 requests" in result.output
    data = yaml.safe_load(result.output)
    assert data["buckets"] == [
        {"prompt_tokens": 16, "concurrency": 1, "max_tokens": 8},
        {"prompt_tokens": 512, "concurrency": 1, "max_tokens": 16},
    ]  # 60 + 40 of 101: 99 %
    assert data["endpoints"] == ["completions", "chat"]
    assert data["features"] == {"use": ["greedy", "penalties", "lora"], "lora": ["sql"]}
    parse_profile(data)


def test_from_coverage_names_a_bad_file(tmp_path: Path) -> None:
    good = _write(tmp_path / "a.json", Counter({WIDE: 1}))
    bad = tmp_path / "b.json"
    bad.write_text('{"version": 1}')
    result = CliRunner().invoke(app, ["profile", "from-coverage", str(good), str(bad)])
    assert result.exit_code == 2
    assert f"{bad} is not a learn file" in result.output and "model" in result.output


# --- end to end on real vLLM ---------------------------------------------------------------------

SECRET = "SECRET-7f3a9c"  # in the users' prompts: in nothing llmwarm writes


def _traffic(client: httpx.Client) -> None:
    """What the minimal profile warms (plain completions, 16-token prompts) and what it lacks:
    chat streamed with penalties, on a prompt of ~300 tokens (its buckets stop at 64), three
    times so the first one's cold miss has a ratio."""
    short = {"model": "tiny", "prompt": f"{SECRET} hello", "max_tokens": 4}
    assert client.post("/v1/completions", json=short).status_code == 200
    long = " ".join([SECRET, *(f"word{i}" for i in range(150))])
    chat = {
        "model": "tiny",
        "messages": [{"role": "user", "content": long}],
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
        "presence_penalty": 0.5,
    }
    for _ in range(3):
        with client.stream("POST", "/v1/chat/completions", json=chat) as answer:
            assert answer.status_code == 200
            answer.read()


@pytest.mark.e2e
def test_traffic_the_warm_up_missed_is_uncovered_then_learned_and_covered(
    tiny_model: Path, tmp_path: Path
) -> None:
    path = tmp_path / "learned.json"
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    with serving(tiny_model, tmp_path / "1", "--learn", str(path)) as (_, client, _):
        _traffic(client)
        coverage = client.get("/warmup/coverage").json()
        metrics = client.get("/metrics").text
    (tmp_path / "coverage-example.json").write_text(json.dumps(coverage, indent=2))
    assert (coverage["requests"], coverage["covered"], coverage["uncovered"]) == (4, 1, 3)
    [miss] = coverage["uncovered_by_requests"]
    assert miss["kind"] == "chat-stream+penalties" and miss["requests"] == 3
    [shape] = miss["shapes"]  # one request at a time: c1
    prompt_class = int(shape.split("-")[0][1:])  # from the answers' usage
    # longer than the minimal profile's buckets (64), but within what its prefill sweep
    # prefilled (up to 1023 tokens): only the kind missed
    assert prompt_class >= 256 and miss["why"] == ["kind chat-stream+penalties not warmed"]
    assert miss["cold_miss_ratio"] is not None and miss["cold_miss_ratio"] > 0
    assert 'llmwarm_requests_total{covered="false"} 3.0' in metrics
    assert 'llmwarm_requests_total{covered="true"} 1.0' in metrics
    assert 'llmwarm_cold_miss_ratio{kind="chat-stream+penalties"}' in metrics

    with serving(tiny_model, tmp_path / "2", "--learn", str(path)) as (_, client, report_path):
        report = json.loads(report_path.read_text())
        assert report["learned"]["file"] == str(path)
        bucket = f"learned-p{min(prompt_class, 1024 - 16 - 64)}-c1-o16"  # fits max_model_len
        assert report["learned"]["buckets"] == [bucket]
        assert "chat-stream+penalties" in report["learned"]["kinds"]
        learned = [b for b in report["buckets"] if b["name"] == bucket]
        assert learned and learned[0]["rounds"]  # warmed, not only planned
        _traffic(client)
        coverage = client.get("/warmup/coverage").json()
    assert (coverage["covered"], coverage["uncovered"]) == (4, 0)
    written = [
        path,
        *(tmp_path / run / name for run in ("1", "2") for name in ("log", "report.json")),
    ]
    for file in written:
        assert SECRET not in file.read_text(errors="replace"), file
    assert sum(row["requests"] for row in json.loads(path.read_text())["shapes"]) == 8


def test_a_process_claims_its_file_while_it_lives_and_leaves_no_lock(tmp_path: Path) -> None:
    # The defect: each start's lock stayed beside the files after it ended (a fleet's `warm`
    # and `bake` runs included), one more file in the shared directory every time.
    (tmp_path / ".pod-c-3333.lock").touch()  # a process gone before it wrote its file
    claim = learn.claim(tmp_path)
    assert claim is not None
    learn.read(tmp_path)  # another replica's start merges and prunes meanwhile
    mine = tmp_path / f".{learn.own_file(tmp_path).stem}.lock"
    assert mine.exists() and not (tmp_path / ".pod-c-3333.lock").exists()
    learn.release(claim, tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".lock")] == [".llmwarm.lock"]
