"""Everything a run needs, resolved and checked once, before any engine starts.

Fast checks come first (profile, report path) so a typo costs no vLLM import; then vLLM's own
parser takes MODEL and every `vllm serve` flag.
"""

from __future__ import annotations

import logging
import os
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmwarm.backend import caches, engine, vllm_args
from llmwarm.errors import ModelNotFound, UsageError
from llmwarm.model.profile import Profile, load_profile, shipped
from llmwarm.model.report import CaptureSizes
from llmwarm.traffic import learn

logger = logging.getLogger(__name__)

OnUnconverged = Literal["serve", "fail"]
# serve: warm, then serve; warm: warm and exit; bake: warm into --cache-dir and exit.
Mode = Literal["serve", "warm", "bake"]


@dataclass(frozen=True)
class Settings:
    vllm_args: Namespace
    profile: Profile
    profile_path: Path
    report_path: Path | None
    plot_path: Path | None
    on_unconverged: OnUnconverged
    mode: Mode
    cache: caches.Cache | None = None  # --cache-dir, opened: its live copy in use
    learn_path: Path | None = None  # the learn file or directory (`traffic.learn`); None: off
    admin_key: str | None = None  # POST /warmup/run's credential; None: loopback clients only
    rewarm_interval_s: float = 30.0  # at least this long from one re-warm's end to the next
    capture: CaptureSizes | None = None  # the CUDA-graph sizes given to vLLM, if llmwarm chose

    @property
    def serve(self) -> bool:
        return self.mode == "serve"

    @property
    def model(self) -> str:
        return vllm_args.model_name(self.vllm_args)


def check_model(model: str) -> None:
    """A MODEL that names a local path must be a model directory (or a GGUF file).

    Anything else is a model hub id, which vLLM resolves itself.
    """
    path = Path(model).expanduser()
    if not (model.startswith(("/", "./", "../", "~")) or path.exists()):
        return
    if path.is_file() and path.suffix == ".gguf":
        return
    if not path.is_dir():
        raise ModelNotFound(
            f"model directory {model} does not exist",
            problems=[("MODEL", f"{model!r} is not a directory")],
        )
    if not (path / "config.json").is_file():
        raise ModelNotFound(
            f"{model} is not a model directory",
            problems=[("MODEL", f"{model!r} has no config.json")],
        )


def check_output_path(path: Path | None, option: str) -> None:
    """An output file must be writable before any engine starts, so no warm-up is lost."""
    if path is None:
        return
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(
            f"{option} {path} is a directory", problems=[(option, f"{path} is a directory")]
        )
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(
            f"{option} {path}: cannot write into {parent}",
            problems=[(option, f"{parent} does not exist or is not writable")],
        )


def _learn_dir(path: Path) -> Path | None:
    """The learn directory inside a writable --cache-dir, made if missing; None (and a
    warning: learning is a side product, and a fleet must not crash-loop over it) when it
    cannot be."""
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        logger.warning(
            "--cache-dir: cannot make the learn directory %s (%s): not learning",
            path, exc.strerror or exc,
        )  # fmt: skip
        return None
    return path


def check_learn_path(path: Path | None) -> None:
    """A learn file must be writable; a learn directory (a fleet's) too."""
    if path is None:
        return
    if not path.is_dir():
        check_output_path(path, "--learn")
    elif not os.access(path, os.W_OK):
        raise UsageError(
            f"--learn {path} is not writable",
            problems=[("--learn", f"{path}: this replica writes its own file there")],
        )


def apply_capture_sizes(
    args: Namespace,
    profile: Profile,
    learn_path: Path | None = None,
    baked: caches.Manifest | None = None,
) -> CaptureSizes:
    """Give vLLM CUDA-graph capture sizes, in tokens, for the steps the profile (and the learn
    file) warms, at most `capture.MAX_SIZES` of them, up to a ceiling that bounds the graph
    pool (`llmwarm.backend.capture`): no warmed decode step runs without a graph (vLLM's default
    stops at 512 tokens), long prefills run without one, unpadded, as in vLLM's default, and
    steps between two classes pad little. GPU only: the CPU platform clears capture sizes.
    Refused with flags that size or switch off graphs themselves.

    With a bake (`baked`: the --cache-dir's manifest) that recorded its sizes, those: the sizes
    are part of vLLM's configuration hash, which names its compile cache, so sizes that followed
    the learn file (it changes with traffic) would miss the baked cache at the next start, and
    compile again. What traffic taught since takes effect at the next bake."""
    for flag, given in (
        ("--cudagraph-capture-sizes", args.cudagraph_capture_sizes is not None),
        ("--max-cudagraph-capture-size", args.max_cudagraph_capture_size is not None),
        ("--enforce-eager", args.enforce_eager),
        ("-cc.cudagraph_mode=NONE", vllm_args.cudagraph_steps(args) == "none"),
    ):
        if given:
            raise UsageError(
                "two sources of CUDA-graph capture sizes",
                problems=[("--capture-sizes-from-profile", f"conflicts with {flag}")],
            )
    from llmwarm.backend import capture
    from llmwarm.model.fit import auto_buckets

    same = baked is not None and baked.model == vllm_args.model_name(args)
    if baked is not None and same and baked.capture_sizes is not None:
        args.cudagraph_capture_sizes = baked.capture_sizes.sizes
        logger.info(
            "--capture-sizes-from-profile: the %d CUDA graphs the bake of %s chose (a new bake "
            "takes what traffic taught since)", len(baked.capture_sizes.sizes),
            baked.baked_at.isoformat(timespec="seconds"),
        )  # fmt: skip
        return baked.capture_sizes
    shape = engine.shape_from_args(args)
    buckets = list(profile.buckets)
    if profile.auto is not None:
        buckets += auto_buckets(profile.auto, shape, chat=True)
    spec = shape.spec_tokens  # as vLLM resolved it, not only as the flag gave it
    learned = learn.size_classes(learn_path) if learn_path is not None else None
    decode_only = vllm_args.cudagraph_steps(args) == "decode"
    found = capture.steps(
        buckets, shape.max_num_batched_tokens, spec, learned,
        max_num_seqs=shape.max_num_seqs, decode_only=decode_only,
    )  # fmt: skip
    # vLLM's own default where its configuration holds one (a GPU: the data-centre Blackwell
    # ceiling, `performance_mode`, dynamic speculative decoding included); on the CPU build,
    # which captures none, llmwarm's model of it (`capture.vllm_default`)
    default = shape.cudagraph_capture_sizes or capture.vllm_default(
        shape.max_num_seqs, shape.max_num_batched_tokens, spec
    )
    plan = capture.plan(found, default, spec_tokens=spec, decode_only=decode_only)
    args.cudagraph_capture_sizes = plan.sizes
    logger.info(
        "--capture-sizes-from-profile: %d CUDA graphs up to %d tokens (vLLM's default: %d up "
        "to %d); a step of any size up to %d tokens pads %.1f %% on average (vLLM's default "
        "%.1f %%), the warmed steps %.1f %%%s", len(plan.sizes), plan.sizes[-1], len(default),
        plan.default_largest, plan.ceiling,
        100 * plan.padding, 100 * (plan.default_padding or 0), 100 * (plan.warmed_padding or 0),
        f"; {len(plan.uncaptured)} warmed prefill steps of {plan.uncaptured[0]} tokens or "
        "more run without a graph, unpadded, as in vLLM's default" if plan.uncaptured else "",
    )  # fmt: skip
    return plan


def _check_outputs(report_path: Path | None, plot_path: Path | None) -> None:
    check_output_path(report_path, "--report")
    check_output_path(plot_path, "--plot")
    if plot_path is not None and plot_path.suffix.lower() != ".png":
        raise UsageError(
            f"--plot {plot_path}: the plot is a PNG",
            problems=[("--plot", f"{plot_path.name!r} does not end in .png")],
        )


def _engine_args(vllm_argv: list[str], prog: str, mode: Mode) -> Namespace:
    """vLLM's arguments, parsed and checked as far as they can be before vLLM starts."""
    args = vllm_args.parse_args(vllm_argv, prog)
    if mode != "serve" and vllm_args.headless(args):
        raise UsageError(
            f"--headless runs engines for another node's API server: not for {mode}",
            problems=[("--headless", f"use llmwarm serve --headless, not llmwarm {mode}")],
        )
    check_model(args.model)
    return args


def resolve(
    vllm_argv: list[str],
    *,
    profile_path: Path | None,
    report_path: Path | None,
    plot_path: Path | None,
    on_unconverged: OnUnconverged,
    capture_sizes_from_profile: bool = False,
    cache_dir: Path | None = None,
    learn_path: Path | None = None,
    admin_key: str | None = None,
    rewarm_interval_s: float = 30.0,
    mode: Mode,
    prog: str,
) -> Settings:
    """Check every input; raise a `UsageError` naming the first bad one."""
    if mode == "bake" and cache_dir is None:
        raise UsageError(
            "bake needs a cache directory",
            problems=[("--cache-dir", "missing (or set LLMWARM_CACHE_DIR)")],
        )
    profile_path = profile_path or shipped("default")
    profile = load_profile(profile_path)
    _check_outputs(report_path, plot_path)
    # before vLLM is imported: its processes inherit where the caches are
    cache = caches.Cache.open(cache_dir) if cache_dir is not None else None
    try:
        if learn_path is None and cache is not None and cache.writable:
            learn_path = _learn_dir(cache.shared / learn.DIR_NAME)
        check_learn_path(learn_path)
        args = _engine_args(vllm_argv, prog, mode)
        if cache is not None:  # (vLLM is imported now: its platform tells the device)
            cache.adopt(engine.toolchain())
        capture = None
        if capture_sizes_from_profile:
            baked = cache.baked if cache is not None and mode != "bake" else None
            capture = apply_capture_sizes(args, profile, learn_path, baked)
    except BaseException:
        if cache is not None:
            cache.close()
        raise
    if mode != "serve":
        # `warm` serves nobody: its warm-up talks to a private loopback port.
        args.host, args.port, args.uds = "127.0.0.1", 0, None
    return Settings(
        vllm_args=args,
        profile=profile,
        profile_path=profile_path,
        report_path=report_path,
        plot_path=plot_path,
        on_unconverged=on_unconverged,
        mode=mode,
        cache=cache,
        learn_path=learn_path,
        admin_key=admin_key or None,
        capture=capture,
        rewarm_interval_s=rewarm_interval_s,
    )
