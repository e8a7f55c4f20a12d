"""A fleet's shared compile caches, end to end on the real CPU vLLM: a directory that is really
read-only (a read-only bind mount in a mount namespace of its own), and two replicas launched
at once on one empty directory. And the probes of a saturated replica. The baked directory is
the session's (`baked`, conftest.py), which the container tests start from too."""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from benchmarks.launch import LLMWARM, free_port
from tests.launch import BAKED_ENGINE, MINIMAL, engine_env, wait_ready

pytestmark = pytest.mark.e2e


def _listing(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file below, with its size and modification time."""
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_a_read_only_cache_dir_is_started_from_and_never_written_and_probes_answer_saturated(
    tiny_model: Path, baked: Path, tmp_path: Path
) -> None:
    assert shutil.which("unshare"), "util-linux unshare is needed for a mount namespace"
    before = _listing(baked)
    port = free_port()
    serve = [*LLMWARM, "serve", str(tiny_model), *BAKED_ENGINE, "--profile", str(MINIMAL),
             "--report", str(tmp_path / "report.json"), "--host", "127.0.0.1", "--port", str(port),
             "--cache-dir", str(baked)]  # fmt: skip
    mount = (f"mount --bind {baked} {baked} && mount -o remount,bind,ro {baked} && "
             f"exec {shlex.join(serve)}")  # fmt: skip
    log = tmp_path / "log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", mount],
            stdout=out, stderr=subprocess.STDOUT, env=engine_env(), start_new_session=True,
        )  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            wait_ready(proc, client, log)
            text = log.read_text(errors="replace")
            assert "is read-only: nothing is written there" in text, text[-3000:]
            assert "match this engine" in text  # it started from the baked caches
            answers = asyncio.run(_probes_while_saturated(f"http://127.0.0.1:{port}"))
        # 32 streams against --max-num-seqs 4: the probes still answer, and say so
        assert answers == {"/ready": [200] * 10, "/live": [200] * 10}, answers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait() == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _listing(baked) == before  # nothing was written there


async def _probes_while_saturated(url: str) -> dict[str, list[int]]:
    body = {"model": "tiny", "prompt": "hello " * 200, "max_tokens": 64, "ignore_eos": True,
            "stream": True}  # fmt: skip
    seen: dict[str, list[int]] = {"/ready": [], "/live": []}
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=None)) as client:  # fmt: skip

        async def stream() -> None:
            async with client.stream("POST", "/v1/completions", json=body) as answer:
                async for _ in answer.aiter_bytes():
                    pass

        load = [asyncio.create_task(stream()) for _ in range(32)]
        try:
            for _ in range(10):
                for path in seen:
                    seen[path].append((await client.get(path, timeout=5)).status_code)
                await asyncio.sleep(0.1)
        finally:
            await asyncio.gather(*load, return_exceptions=True)
    return seen


def test_two_replicas_on_one_empty_cache_dir_both_warm_and_restarted_both_start_from_it(
    tiny_model: Path, tmp_path: Path
) -> None:
    # two at once: one publishes under the lock while the other compiles or waits for it (a
    # third adds nothing the lock does not already order)
    shared = tmp_path / "shared"

    def replicas(round_: int) -> list[str]:
        procs = []
        for i in range(2):
            with (tmp_path / f"round{round_}-{i}.log").open("wb") as out:
                procs.append(subprocess.Popen(
                    [*LLMWARM, "warm", str(tiny_model), *BAKED_ENGINE, "--profile", str(MINIMAL),
                     "--report", str(tmp_path / f"r{i}.json"), "--cache-dir", str(shared)],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    env=engine_env() | {"VLLM_CPU_OMP_THREADS_BIND": str(i % 2)},
                ))  # fmt: skip
        codes = [p.wait() for p in procs]
        logs = [(tmp_path / f"round{round_}-{i}.log").read_text(errors="replace")
                for i in range(2)]  # fmt: skip
        assert codes == [0, 0], [log[-2000:] for log in logs]
        return logs

    first = replicas(1)
    # the first to finish published (under the lock); the other found it there, or, finishing
    # later still, nothing to add
    assert sum("compile caches published" in log for log in first) >= 1
    manifest = json.loads((shared / "llmwarm-bake.json").read_text())
    assert manifest["model"] == "tiny"
    assert not [p for p in shared.iterdir() if p.name.startswith((".staging", ".old"))]
    published = _listing(shared)
    second = replicas(2)
    for log in second:
        assert "its baked caches copied" in log and "match this engine" in log, log[-2000:]
        assert "compile caches published" not in log
    assert _listing(shared) == published  # started from it, never written again
