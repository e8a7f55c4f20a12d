"""The container entrypoint, run the way the image runs it, without Docker: the image's
ENTRYPOINT and ENV, configuration by environment as in deploy/, llmwarm as PID 1 of its own
PID namespace (`unshare`), signals from outside as `docker stop` / the kubelet send them.

`llmwarm bake` fills a cache directory first; the entrypoint then starts from it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import dockerfile
from tests.launch import (
    BAKED_ENGINE,
    ENGINE_FLAGS,
    MINIMAL,
    engine_env,
    free_port,
    wait_ready,
)

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent  # where the image's PATH finds `llmwarm`


def _container_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Dockerfile.cpu's ENV, with its paths mapped under `tmp` (the container's volumes)."""
    _, image_env, _ = dockerfile("Dockerfile.cpu")
    env = engine_env()
    for key, value in image_env.items():
        if key == "PATH":
            env[key] = f"{BIN}:{os.environ['PATH']}"
        elif value.startswith("/var/"):
            env[key] = str(tmp / value.lstrip("/"))
            Path(env[key]).parent.mkdir(parents=True, exist_ok=True)
        else:
            env[key] = value
    return env | extra


def _pid1(proc: subprocess.Popen[bytes]) -> psutil.Process:
    """llmwarm: the child of `unshare`, PID 1 in its namespace."""
    while not (children := psutil.Process(proc.pid).children()):
        assert proc.poll() is None, "unshare ended without starting llmwarm"
        time.sleep(0.05)
    return children[0]


def _status(process: psutil.Process, field: str) -> str:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return line.split(":", 1)[1].strip()
    raise KeyError(field)


def _namespace_pid(process: psutil.Process) -> int:
    """Its PID inside its own (innermost) PID namespace."""
    return int(_status(process, "NSpid").split()[-1])


def _catches_sigterm(process: psutil.Process) -> bool:
    return bool(int(_status(process, "SigCgt"), 16) & (1 << (signal.SIGTERM - 1)))


def test_bake_leaves_the_compile_caches_and_a_manifest(baked: Path) -> None:
    manifest = json.loads((baked / "llmwarm-bake.json").read_text())
    assert manifest["model"] == "tiny" and manifest["vllm_version"] == "0.32.0"
    assert len(manifest["config_hash"]) >= 10 and manifest["engine_start_s"] > 0
    # compiled code: on vLLM's CPU build, inductor's C++ kernels (AOT is off there, see
    # llmwarm/caches.py); on GPUs also vLLM's AOT artifacts, Triton and FlashInfer kernels
    kernels = list((baked / "inductor").rglob("*.so"))
    assert kernels, sorted(str(p.relative_to(baked)) for p in baked.rglob("*"))


def test_entrypoint_serves_warm_from_the_baked_cache_and_stops_on_sigterm(
    tiny_model: Path, baked: Path, tmp_path: Path
) -> None:
    assert shutil.which("unshare"), "util-linux unshare is needed to run as PID 1"
    entrypoint, _, _ = dockerfile("Dockerfile.cpu")
    port = free_port()
    env = _container_env(tmp_path, LLMWARM_PROFILE=str(MINIMAL), LLMWARM_CACHE_DIR=str(baked))
    log = tmp_path / "log"
    # `docker run IMAGE MODEL [vllm flags]`: the arguments follow the ENTRYPOINT
    cmd = [
        "unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--",
        *entrypoint, str(tiny_model), *BAKED_ENGINE, "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    t0 = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        llmwarm = _pid1(proc)
        assert Path(llmwarm.cmdline()[1]).name == "llmwarm" and llmwarm.cmdline()[2] == "serve"
        assert _namespace_pid(llmwarm) == 1  # no shell in between: it gets the signals
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            wait_ready(proc, client, log)
        print(f"entrypoint, baked cache: ready in {time.monotonic() - t0:.1f} s")
        text = log.read_text()
        assert "match this engine" in text, text[-3000:]  # it started from the baked caches
        assert "Compiling model again due to a load failure" not in text  # and they loaded
        report = Path(env["LLMWARM_REPORT"])  # the image's report path, in its volume
        assert json.loads(report.read_text())["converged"] in (True, False)
        children = llmwarm.children(recursive=True)
        llmwarm.send_signal(signal.SIGTERM)  # from outside the namespace, like `docker stop`
        assert proc.wait() == 0
        psutil.wait_procs(children)  # each ends (one left behind: the test's timeout)
        assert not llmwarm.is_running()
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_pid1_stops_on_sigterm_even_before_its_event_loop_runs(
    tiny_model: Path, tmp_path: Path
) -> None:
    # The first seconds go to importing vLLM; PID 1 ignores signals it has no handler for.
    entrypoint, _, _ = dockerfile("Dockerfile.cpu")
    cmd = ["unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--",
           *entrypoint, str(tiny_model), *ENGINE_FLAGS, "--port", str(free_port())]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_container_env(tmp_path)
    )
    try:
        llmwarm = _pid1(proc)
        assert _namespace_pid(llmwarm) == 1
        while not _catches_sigterm(llmwarm):  # the CLI is up; vLLM is being imported
            assert proc.poll() is None, "llmwarm ended before it handled SIGTERM"
            time.sleep(0.02)
        llmwarm.send_signal(signal.SIGTERM)
        assert proc.wait() == 130
        out = proc.stdout.read().decode() if proc.stdout else ""
        assert "Traceback" not in out, out[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
