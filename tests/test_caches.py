"""The compile-cache directory (bake / --cache-dir) and the environment that configures llmwarm."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from llmwarm.backend import caches
from llmwarm.cli import app
from llmwarm.errors import UsageError
from llmwarm.serve import settings


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    """caches.use writes os.environ (for vLLM's processes): put it back after each test, so
    later tests' engines do not inherit a scratch cache directory."""
    saved = dict(os.environ)
    for var in (*caches.ENV, "VLLM_USE_AOT_COMPILE"):
        os.environ.pop(var, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_use_points_every_cache_into_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", "/elsewhere")
    caches.use(tmp_path)
    assert {var: os.environ[var] for var in caches.ENV} == {
        "VLLM_CACHE_ROOT": f"{tmp_path}/vllm",
        "TORCHINDUCTOR_CACHE_DIR": f"{tmp_path}/inductor",
        "TRITON_CACHE_DIR": f"{tmp_path}/triton",
        "FLASHINFER_WORKSPACE_BASE": f"{tmp_path}/flashinfer",
        "TVM_FFI_CACHE_DIR": f"{tmp_path}/tvm-ffi",
        "TORCH_EXTENSIONS_DIR": f"{tmp_path}/torch-ext",
        "CUDA_CACHE_PATH": f"{tmp_path}/cuda",
        "TILELANG_CACHE_DIR": f"{tmp_path}/tilelang",
        "CUTE_DSL_CACHE_DIR": f"{tmp_path}/cute-dsl",
    }
    assert "HF_HOME" not in caches.ENV and "XDG_CACHE_HOME" not in caches.ENV  # models stay
    # this machine runs vLLM's CPU build, whose AOT artifacts do not load back
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "0"


def test_a_users_aot_setting_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    caches.use(tmp_path)
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "1"


def test_open_creates_the_directory_and_refuses_a_file(tmp_path: Path) -> None:
    cache = caches.Cache.open(tmp_path / "a" / "b")
    try:
        assert cache.shared.is_dir() and cache.shared.is_absolute() and cache.baked is None
        assert os.environ["VLLM_CACHE_ROOT"] == str(cache.live / "vllm")  # never the shared
    finally:
        cache.close()
    assert not cache.live.exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError) as info:
        caches.Cache.open(tmp_path / "f")
    assert info.value.problems[0][0] == "--cache-dir"


def _manifest(**change: Any) -> caches.Manifest:
    base: dict[str, Any] = {
        "llmwarm_version": "0.1.0",
        "vllm_version": "0.32.0",
        "model": "tiny",
        "config_hash": "abc123def456",
        "engine_start_s": 40.0,
    }
    return caches.Manifest(**(base | change))


def test_manifest_round_trip_and_mismatch(tmp_path: Path) -> None:
    assert caches.read_manifest(tmp_path) is None
    assert "nothing was baked" in str(caches.mismatch(None, _manifest()))
    caches.write_manifest(tmp_path, _manifest())
    baked = caches.read_manifest(tmp_path)
    assert baked == _manifest().model_copy(update={"baked_at": baked.baked_at})  # type: ignore[union-attr]
    assert caches.mismatch(baked, _manifest()) is None
    assert "vLLM 0.32.0, running 0.33.0" in str(
        caches.mismatch(baked, _manifest(vllm_version="0.33.0"))
    )
    assert "another engine configuration" in str(
        caches.mismatch(baked, _manifest(config_hash="fff"))
    )
    (tmp_path / caches.MANIFEST).write_text("{not json")
    assert caches.read_manifest(tmp_path) is None


def test_a_bake_for_another_gpu_or_toolchain_is_checked_first_and_never_copied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The defect: the manifest's hard keys were vLLM's version and its configuration hash,
    # which leaves the device out on purpose; the device and torch were only logged, CUDA,
    # Triton and FlashInfer not recorded, and every baked tree was copied (gigabytes a start)
    # before anything was checked.
    h100 = {
        "device": "NVIDIA H100 (compute capability 9.0)", "torch_version": "2.13.0",
        "cuda_version": "12.9", "triton_version": "3.4.0", "driver_version": "575.57",
    }  # fmt: skip
    _bake_by_hand(tmp_path / "shared", _manifest(**h100))
    l4 = {**h100, "device": "NVIDIA L4 (compute capability 8.9)", "triton_version": "3.5.0"}
    cache = caches.Cache.open(tmp_path / "shared")
    try:
        with caplog.at_level("WARNING", logger="llmwarm.backend.caches"):
            cache.adopt(l4)
        assert cache.baked is None and not list(cache.live.iterdir())  # nothing copied
        assert (
            "baked on 'NVIDIA H100 (compute capability 9.0)', not 'NVIDIA L4 (compute "
            "capability 8.9)'; with Triton '3.4.0', not '3.5.0'"
        ) in caplog.text
        # the same kind of card and toolchain: copied; another driver is a warning only
        cache.adopt({**h100, "driver_version": "580.65"})
        assert cache.baked is not None and (cache.live / "vllm" / "graph.py").exists()
        newer_driver = _manifest(**{**h100, "driver_version": "580.65"})
        assert caches.mismatch(cache.baked, newer_driver) is None
        assert "driver '575.57', now '580.65'" in str(caches.differences(cache.baked, newer_driver))
        # and a serving replica of the other kind never replaces the bake
        assert "baked on" in str(caches.mismatch(cache.baked, _manifest(**l4)))
    finally:
        cache.close()
    # a manifest from before these fields were recorded holds nothing against a toolchain
    assert caches.mismatch(_manifest(), _manifest(**l4)) is None


@pytest.fixture
def resolved(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the CLI hands to settings.resolve (which then stops the run)."""
    seen: dict[str, Any] = {}

    def fake(argv: list[str], **options: Any) -> settings.Settings:
        seen.update(options, argv=argv)
        raise UsageError("stop here")

    monkeypatch.setattr(settings, "resolve", fake)
    return seen


ENV = {
    "LLMWARM_PROFILE": "llmwarm/configs/minimal.yaml",
    "LLMWARM_REPORT": "env-report.json",
    "LLMWARM_PLOT": "env-plot.png",
    "LLMWARM_ON_UNCONVERGED": "fail",
    "LLMWARM_CACHE_DIR": "/tmp/env-cache",
    "LLMWARM_CAPTURE_SIZES_FROM_PROFILE": "true",
    "LLMWARM_LEARN": "/tmp/env-learned.json",
    "LLMWARM_ADMIN_KEY": "env-admin",
    "LLMWARM_REWARM_MIN_INTERVAL": "7.5",
}


def test_the_environment_configures_every_option(resolved: dict[str, Any]) -> None:
    result = CliRunner(env=ENV).invoke(app, ["bake", "some/model", "--max-model-len", "64"])
    assert result.exit_code == 2 and "stop here" in result.output
    assert resolved == {
        "argv": ["some/model", "--max-model-len", "64"],
        "mode": "bake",
        "prog": "llmwarm bake",
        "profile_path": Path("llmwarm/configs/minimal.yaml"),
        "report_path": Path("env-report.json"),
        "plot_path": Path("env-plot.png"),
        "on_unconverged": "fail",
        "cache_dir": Path("/tmp/env-cache"),
        "capture_sizes_from_profile": True,
        "learn_path": Path("/tmp/env-learned.json"),
        "admin_key": "env-admin",
        "rewarm_interval_s": 7.5,
    }


def test_flags_win_over_the_environment(resolved: dict[str, Any], tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text("buckets: [{prompt_tokens: 8, concurrency: 1, max_tokens: 4}]\n")
    result = CliRunner(env=ENV).invoke(
        app,
        ["serve", "m", "--profile", str(profile), "--report", "flag.json", "--plot", "f.png",
         "--on-unconverged", "serve", "--cache-dir", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 2
    assert resolved["profile_path"] == profile
    assert resolved["report_path"] == Path("flag.json")
    assert resolved["plot_path"] == Path("f.png")
    assert resolved["on_unconverged"] == "serve"
    assert resolved["cache_dir"] == tmp_path


def test_the_help_and_the_docs_list_every_variable() -> None:
    from benchmarks.launch import ROOT
    from llmwarm.cli import ENV_HELP
    from tests.conftest import llmwarm_env_vars

    known = {v for v in llmwarm_env_vars() if v.startswith("LLMWARM_")}  # bench: OPENAI_API_KEY
    assert set(re.findall(r"LLMWARM_\w+", ENV_HELP)) == known
    page = (ROOT / "docs" / "getting-started.md").read_text()
    assert {v for v in known if f"`{v}`" not in page} == set()


def _bake_by_hand(directory: Path, manifest: caches.Manifest, text: str = "v1") -> None:
    for sub, name in (("vllm", "graph.py"), ("inductor", "kernel.so")):
        (directory / sub).mkdir(parents=True, exist_ok=True)
        (directory / sub / name).write_text(text)
    caches.write_manifest(directory, manifest)


def _opened(directory: Path) -> caches.Cache:
    """`Cache.open` and its `adopt` as a start makes them (these bakes record no toolchain);
    in between, importing vLLM may make a cache's directory where `open` pointed it."""
    cache = caches.Cache.open(directory)
    (cache.live / "inductor").mkdir()
    cache.adopt({})
    return cache


def test_a_baked_directory_is_copied_in_and_never_written(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    _bake_by_hand(shared, _manifest())
    before = {p: p.read_text() for p in shared.rglob("*") if p.is_file()}
    before[shared / caches.LOCK] = ""  # how replicas take turns: the one file it may add
    cache = _opened(shared)
    try:
        assert (
            cache.baked is not None and (cache.live / "inductor" / "kernel.so").read_text() == "v1"
        )
        (cache.live / "vllm" / "graph.py").write_text("compiled again")  # vLLM writes its copy
        assert cache.publish(_manifest()) is False  # it matches: nothing to publish
    finally:
        cache.close()
    assert {p: p.read_text() for p in shared.rglob("*") if p.is_file()} == before


def test_publish_fills_an_empty_directory_and_keeps_another_engines_caches(
    tmp_path: Path,
) -> None:
    cache = caches.Cache.open(tmp_path / "shared")
    try:
        _bake_by_hand(cache.live, _manifest(), text="mine")
        (cache.live / caches.MANIFEST).unlink()
        assert cache.publish(_manifest()) is True
        assert (cache.shared / "vllm" / "graph.py").read_text() == "mine"
        assert caches.read_manifest(cache.shared) is not None
        # another engine's caches are not replaced by a serving replica, only by a bake
        other = _manifest(config_hash="fff000")
        assert cache.publish(other) is False
        assert cache.publish(other, force=True) is True
        assert caches.read_manifest(cache.shared).config_hash == "fff000"  # type: ignore[union-attr]
        assert [p.name for p in cache.shared.iterdir() if p.name.startswith(".")] == [caches.LOCK]
    finally:
        cache.close()


def test_a_reader_never_copies_half_of_a_publish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Replicas starting while another publishes: the reader waits for the publish (a shared
    # lock against its exclusive one) and copies what the new manifest vouches for.
    shared = tmp_path / "shared"
    _bake_by_hand(shared, _manifest(), text="old")
    writer = _opened(shared)
    _bake_by_hand(writer.live, _manifest(), text="new")
    halfway, go_on = threading.Event(), threading.Event()
    copy = shutil.copytree

    def slow_copy(src: Path, dst: Path, **kwargs: Any) -> Any:
        done = copy(src, dst, **kwargs)
        if ".staging-" in str(dst) and not halfway.is_set():
            halfway.set()  # one tree copied, the manifest gone, the other tree not yet
            go_on.wait(30)
        return done

    monkeypatch.setattr(shutil, "copytree", slow_copy)
    publishing = threading.Thread(
        target=writer.publish, args=(_manifest(),), kwargs={"force": True}
    )
    publishing.start()
    assert halfway.wait(30)
    opened: list[caches.Cache] = []
    reading = threading.Thread(target=lambda: opened.append(_opened(shared)))
    reading.start()
    reading.join(0.3)
    assert reading.is_alive()  # it waits for the publish
    go_on.set()
    publishing.join(30)
    reading.join(30)
    [reader] = opened
    try:
        texts = {p.read_text() for p in reader.live.rglob("*") if p.is_file()}
        assert texts == {"new"}, texts  # all of the new bake, nothing of the old
    finally:
        reader.close()
        writer.close()


def test_a_read_only_directory_is_read_and_nothing_is_written(
    small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _bake_by_hand(small_fs, _manifest())
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    with caplog.at_level("INFO", logger="llmwarm.backend.caches"):
        cache = _opened(small_fs)
    try:
        assert not cache.writable and cache.baked is not None
        assert (cache.live / "vllm" / "graph.py").read_text() == "v1"
        assert cache.publish(_manifest(config_hash="fff000"), force=True) is False
        assert "is read-only" in caplog.text
    finally:
        cache.close()


def _nfs_flock(fd: int, how: int) -> None:
    """`flock` as Linux emulates it on NFS: a byte-range lock (`lockf`), which a read-only
    descriptor cannot take exclusively (EBADF). (This machine's kernel has no NFS to mount.)"""
    fcntl.lockf(fd, how)


def test_publishing_works_where_only_a_read_write_descriptor_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The defect: the lock file was opened read-only; on NFS the exclusive lock of a publish
    # failed with EBADF, an OSError that escaped as a traceback right after a warm-up, in
    # every replica of a Deployment on a shared volume.
    monkeypatch.setattr(fcntl, "flock", _nfs_flock)
    cache = caches.Cache.open(tmp_path / "shared")
    try:
        _bake_by_hand(cache.live, _manifest(), text="mine")
        assert cache.publish(_manifest()) is True
    finally:
        cache.close()
    reader = _opened(tmp_path / "shared")  # a shared lock, read-write as well
    try:
        assert (reader.live / "vllm" / "graph.py").read_text() == "mine"
    finally:
        reader.close()


def test_copies_left_by_a_killed_process_are_removed_at_the_next_start(tmp_path: Path) -> None:
    # The defect: the live copy was removed only on a clean exit; each SIGKILL, OOM or
    # container restart on the same emptyDir left gigabytes behind until the pod was evicted.
    shared = tmp_path / "shared"
    _bake_by_hand(shared, _manifest())
    code = (
        "import sys, time; from pathlib import Path; from llmwarm.backend import caches; "
        "c = caches.Cache.open(Path(sys.argv[1])); c.adopt({}); print(c.live, flush=True); "
        "time.sleep(3600)"
    )
    command = [sys.executable, "-c", code, str(shared)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    lives: list[Path] = []
    try:  # (each waited for, whatever fails: none left for a later test's garbage collection)
        for proc in procs:
            assert proc.stdout is not None
            with proc.stdout:
                line = proc.stdout.readline().strip()
            assert line, f"the cache's process failed: exit {proc.wait()}"
            lives.append(Path(line))
        orphan, living = lives
        procs[0].kill()
        procs[0].wait()
        os.utime(orphan, (time.time() - 120, time.time() - 120))  # not one made a moment ago
        os.utime(living, (time.time() - 120, time.time() - 120))
        assert (orphan / "vllm" / "graph.py").is_file()
        cache = caches.Cache.open(shared)
        cache.close()
        assert not orphan.exists()  # its process is gone
        assert (living / "vllm" / "graph.py").is_file()  # its process lives
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        if len(lives) == 2:
            shutil.rmtree(lives[1], ignore_errors=True)
