"""The CPU image (Dockerfile.cpu), built by scripts/build-image and run under podman as users
run it: the tiny model mounted read-only, configuration by environment as in deploy/, a
read-only root filesystem, its own non-root user, llmwarm as PID 1 getting `podman stop`'s
SIGTERM, volumes for the baked cache (read-only), the report and the learn files.

The image is built once per run (its layers reused from the run before: only the code's layer
changes with a commit), and every test here runs on one xdist worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from benchmarks.launch import ENGINE_FLAGS, ROOT, free_port
from tests.launch import engine_env

pytestmark = pytest.mark.e2e

# runc with the cgroupfs manager, and the container's limits within the host's (crun fails here)
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000", "--shm-size", "1g"]
TAG = "localhost/llmwarm-cpu:test"
UID = 10001  # the image's user
# /tmp on a tmpfs (the root is read-only): exec, for the C++ kernels torch.compile loads
TMP = ["--read-only", "--tmpfs", "/tmp:rw,exec,nosuid,nodev,size=2g"]
MINIMAL = "/opt/llmwarm/llmwarm/configs/minimal.yaml"  # shipped in the image


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True)
    assert not check or done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
    return done


@pytest.fixture(scope="session")
def image() -> str:
    """Built once a run; `scripts/build-image` says how long it took and the image's size."""
    done = subprocess.run(
        [str(ROOT / "scripts" / "build-image"), TAG], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    print(done.stdout)
    return TAG


def _env() -> list[str]:
    """The engine's environment here, as the tests' engines have it (a core of their own)."""
    env = engine_env()
    keep = ["VLLM_CPU_KVCACHE_SPACE", "VLLM_USE_AOT_COMPILE", "VLLM_CPU_OMP_THREADS_BIND"]
    return [f"--env={key}={env[key]}" for key in keep if key in env]


def _owned(path: Path) -> Path:
    """A host directory the image's user writes (a volume, as a pod's securityContext makes it)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, UID, UID)
    return path


@contextlib.contextmanager
def container(name: str, *args: str) -> Iterator[str]:
    """`podman run -d ... IMAGE ARGS`; removed at the end, whatever happened."""
    podman("run", "-d", "--name", name, *LIMITS, *TMP, *_env(), *args)
    try:
        yield name
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


def _state(name: str) -> dict[str, Any]:
    return dict(json.loads(podman("inspect", "--format", "{{json .State}}", name).stdout))


def _host_pids(name: str) -> list[int]:
    """Every process of the container, by its PID on the host."""
    out = podman("top", name, "hpid").stdout.split()[1:]
    return [int(pid) for pid in out]


def _until(what: str, check: Callable[[], bool], name: str, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout  # a hang guard with the log, never a bound on speed
    while not check():
        state = _state(name)
        assert state["Running"], (
            f"{what}: the container ended\n{podman('logs', name).stderr[-3000:]}"
        )
        assert time.monotonic() < deadline, f"never {what}\n{podman('logs', name).stderr[-3000:]}"
        time.sleep(0.2)


def test_the_image_bakes_then_serves_warm_from_the_bake_read_only_and_drains_on_stop(
    image: str, tiny_model: Path, tmp_path: Path
) -> None:
    cache, state = _owned(tmp_path / "cache"), _owned(tmp_path / "state")
    _owned(state / "learn")  # a learn directory: a file per replica
    model = ["--volume", f"{tiny_model}:/models/tiny:ro"]
    flags = [*ENGINE_FLAGS, "--served-model-name", "tiny"]
    # the bake job: its own entrypoint, the cache volume writable, exit 0 through podman
    baked = subprocess.run(
        [*PODMAN, "run", "--rm", *LIMITS, *TMP, *_env(), *model,
         "--volume", f"{cache}:/var/cache/llmwarm", "--env", f"LLMWARM_PROFILE={MINIMAL}",
         "--entrypoint", "llmwarm", image, "bake", "/models/tiny", *flags,
         "--report", "/tmp/bake.json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert baked.returncode == 0, baked.stderr[-3000:]
    assert (cache / "llmwarm-bake.json").is_file()
    bake_start = json.loads((cache / "llmwarm-bake.json").read_text())["engine_start_s"]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with container(
        "llmwarm-serve-test", *model,
        "--volume", f"{cache}:/var/cache/llmwarm:ro",  # the fleet's baked cache, read-only
        "--volume", f"{state}:/var/lib/llmwarm",  # the report and learn files
        "--env", f"LLMWARM_PROFILE={MINIMAL}", "--env", "LLMWARM_LEARN=/var/lib/llmwarm/learn",
        "--publish", f"127.0.0.1:{port}:8000",
        image, "/models/tiny", *flags, "--shutdown-timeout", "600",
    ) as name:  # fmt: skip
        refused: list[httpx.Response] = []
        with httpx.Client(base_url=url, timeout=30) as client:

            def ready() -> bool:
                try:
                    r = client.get("/ready")
                except httpx.TransportError:
                    return False
                if r.status_code == 503:
                    refused.append(r)
                return r.status_code == 200

            _until("ready", ready, name)
            assert refused and all(int(r.headers["retry-after"]) > 0 for r in refused)
            answer = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
            assert answer.status_code == 200, answer.text
        # its own user, not root; PID 1 is llmwarm itself
        assert podman("exec", name, "id", "-u").stdout.strip() == str(UID)
        assert "llmwarm serve" in podman("exec", name, "cat", "/proc/1/cmdline").stdout.replace(
            "\0", " "
        )
        # a stream in flight, then `podman stop`: it drains, exit 0 within the grace period
        # (its events, not its tokens: a loaded API server merges the tokens of several steps
        # into one event; the last event's usage counts them)
        events: list[dict[str, Any]] = []

        def stream() -> None:
            body = {"model": "tiny", "prompt": "drain", "max_tokens": 200, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=None) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        events.append(json.loads(line.removeprefix("data: ")))

        streaming = threading.Thread(target=stream)
        streaming.start()
        while not events:
            time.sleep(0.01)
        stopped = podman("stop", "--time", "120", name)
        streaming.join()
        assert stopped.returncode == 0
        assert events[-1]["usage"]["completion_tokens"] == 200  # every token: drained
        assert _state(name)["ExitCode"] == 0
        log = podman("logs", name).stderr
    assert "match this engine" in log, log[-3000:]  # started from the baked caches
    assert "Compiling model again due to a load failure" not in log and "Traceback" not in log
    report = state / "report.json"
    data = json.loads(report.read_text())
    assert data["error"] is None
    start = data["engine_start_s"]
    print(f"engine start: baked at {bake_start:.1f} s (cold), from the bake {start:.1f} s")
    # on the volume, the image's user's, readable by a sidecar (the umask's modes)
    for written in (report, *sorted((state / "learn").glob("*.json"))):
        assert written.stat().st_uid == UID, written
        assert stat.S_IMODE(written.stat().st_mode) == 0o644, written
    assert list((state / "learn").glob("*.json")), "no learn file"


def test_exit_codes_reach_podman_and_a_kill_leaves_no_process(
    image: str, tiny_model: Path, tmp_path: Path
) -> None:
    # the report's folder: a volume (the root is read-only)
    state = _owned(tmp_path / "state")
    model = ["--volume", f"{tiny_model}:/models/tiny:ro", "--volume", f"{state}:/var/lib/llmwarm"]
    # a bad flag: 2, through `podman run` and `podman wait`
    bad = subprocess.run(
        [*PODMAN, "run", "--rm", *LIMITS, *TMP, *model, image, "/models/tiny", "--no-such-flag"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "--no-such-flag" in bad.stderr
    # SIGTERM as soon as llmwarm handles it (PID 1 ignores a signal it has no handler for):
    # interrupted while starting, 130, at once rather than at the stop timeout
    with container("llmwarm-early-stop", *model, image, "/models/tiny", *ENGINE_FLAGS) as name:
        pid = int(_state(name)["Pid"])  # PID 1's, on the host
        _until("handling SIGTERM", lambda: _catches_sigterm(pid), name)
        t0 = time.monotonic()
        podman("stop", "--time", "300", name)
        assert _state(name)["ExitCode"] == 130 and time.monotonic() - t0 < 300
    # `podman kill` while the engine loads: every process of the container ends
    with container("llmwarm-kill", *model, image, "/models/tiny", *ENGINE_FLAGS) as name:
        _until(
            "the engine's processes",
            lambda: "EngineCore" in podman("top", name, "args", check=False).stdout,
            name,
        )
        pids = _host_pids(name)
        assert len(pids) >= 2
        podman("kill", name)
        assert podman("wait", name).stdout.strip() == "137"
        procs = []
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                procs.append(psutil.Process(pid))
        psutil.wait_procs(procs)  # each ends (one left behind: the test's timeout)


def _catches_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << 14))  # SIGTERM is 15
    return False


def test_the_gpu_dockerfile_builds_its_layers_on_vllms_cpu_build(image: str) -> None:
    # No GPU image can be pulled or run here: Dockerfile's own layers (llmwarm installed on
    # vLLM, its import checked) are built on Dockerfile.cpu's `engine` stage instead, vLLM's
    # CPU build where the vLLM image has its GPU build
    script = str(ROOT / "scripts" / "build-image")
    engine = "localhost/llmwarm-engine:test"
    for tag, env in [
        (engine, {"LLMWARM_IMAGE_TARGET": "engine"}),  # (its layers: the image's, reused)
        ("localhost/llmwarm-gpu-layers:test",
         {"LLMWARM_IMAGE_FILE": "Dockerfile", "LLMWARM_IMAGE_BASE": engine}),
    ]:  # fmt: skip
        done = subprocess.run([script, tag], capture_output=True, text=True, env=os.environ | env)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    imported = podman(
        "run", "--rm", *LIMITS, "--workdir", "/", "--entrypoint", "python3",
        "localhost/llmwarm-gpu-layers:test",
        "-c", "import llmwarm, vllm; print(llmwarm.__file__, vllm.__version__)",
    )  # fmt: skip
    assert "site-packages/llmwarm" in imported.stdout and "0.32.0" in imported.stdout
