"""The vLLM adapter's engine: vLLM's configuration and its `AsyncLLM`.

vLLM's internal API moves between releases; everything llmwarm needs from it is in the adapter,
written against vLLM 0.32: `llmwarm.backend.vllm_args` (its command line), this module and
`llmwarm.backend.frontend` (its HTTP side). `start_engine` builds and shuts down the `AsyncLLM`, and
`Engine` is what the lifecycle and the warm-up see of it (`EngineClient`; the tests run a fake
one).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import sys
import threading
import time
from argparse import Namespace
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, cast

import psutil

from llmwarm import lifeline
from llmwarm.backend import frontend, jitmon, loading, vllm_args
from llmwarm.errors import (
    EngineDied,
    Problem,
    StartupError,
    VllmArgsError,
    from_validation,
)
from llmwarm.model.endpoints import SPECS
from llmwarm.model.fit import EngineShape
from llmwarm.model.report import JitEvents

if TYPE_CHECKING:
    from starlette.types import ASGIApp
    from vllm.v1.engine.async_llm import AsyncLLM

    from llmwarm.backend.frontend import VllmStop
    from llmwarm.model.corpus import Tokenizer

logger = logging.getLogger(__name__)


class _Abandoned(Exception):
    """The engine build was cancelled; its result is not wanted."""


def _flag(loc: tuple[int | str, ...]) -> str:
    return "--" + "-".join(str(part) for part in loc).replace("_", "-")


def _config_problems(exc: Exception) -> list[Problem]:
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return [Problem("vllm flags", str(exc) or repr(exc))]
    return from_validation(exc, root=f"vllm {exc.title}", echo=False, where=_flag)


def _end_children() -> None:
    """Kill every process this one started (the EngineCore and its workers) at once.

    Only for abnormal exits: an interrupted start, a forced exit. SIGKILL, all together: a
    vLLM engine ignores SIGTERM until it has finished loading, and a worker ended before its
    EngineCore makes the EngineCore print a start-up failure traceback.
    """
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            # multiprocessing's resource tracker ends with this process and cleans up after it
            if "resource_tracker" not in " ".join(child.cmdline()):
                child.kill()


def force_exit(code: int) -> None:
    """Leave at once, taking the engine processes along (a second Ctrl-C)."""
    _end_children()
    os._exit(code)


class EngineClient(Protocol):
    """What llmwarm needs of a started engine (in the spirit of vLLM's `EngineClient`).

    `Engine` is vLLM's; the lifecycle tests run a fake one.
    """

    start_s: float  # seconds from engine start to engine ready
    vllm_version: str
    # what compiles, and with what (`toolchain`): the device (the GPU's name and compute
    # capability, or the CPU), torch, CUDA, the driver, Triton, FlashInfer
    toolchain: dict[str, str]

    def shape(self) -> EngineShape: ...
    def tokenizer(self) -> Tokenizer: ...
    def is_dead(self) -> bool: ...
    def dead_reason(self) -> str: ...
    async def build_app(self, stop: VllmStop) -> ASGIApp: ...
    def app_lifespan(self, app: ASGIApp) -> AbstractAsyncContextManager[None]: ...
    def config_hash(self) -> str: ...
    async def jit_phase(self, phase: str) -> None: ...
    async def jit_events(self) -> JitEvents | None: ...
    def take_running_peak(self) -> int | None: ...


async def wait_dead(engine: EngineClient, interval: float = 0.5) -> NoReturn:
    """Raise `EngineDied` when the engine has died (like vLLM's own API-server watchdog)."""
    while not engine.is_dead():
        await asyncio.sleep(interval)
    raise EngineDied(
        f"the vLLM engine died: {engine.dead_reason()}",
        problems=[("engine", "the EngineCore process ended; see the log above")],
    )


class RunningPeak:
    """The largest count of running requests vLLM's scheduler reported since last taken, from
    a stat logger of ours beside vLLM's own (none with `--disable-log-stats`)."""

    def __init__(self) -> None:
        self.peak: int | None = None

    def take(self) -> int | None:
        peak, self.peak = self.peak, None
        return peak

    def logger(self) -> Any:
        """A per-engine stat-logger factory for `AsyncLLM` (`stat_loggers`)."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        holder = self

        class RunningPeakLogger(StatLoggerBase):  # type: ignore[misc]
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(
                self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                engine_idx: int = 0,
            ) -> None:  # fmt: skip
                if scheduler_stats is not None:
                    running = int(scheduler_stats.num_running_reqs)
                    holder.peak = max(holder.peak or 0, running)

            def log_engine_initialized(self) -> None:
                pass

        return RunningPeakLogger


class Engine:
    """A started vLLM V1 `AsyncLLM`, seen through `EngineClient`."""

    def __init__(
        self,
        llm: AsyncLLM,
        args: Namespace,
        start_s: float,
        tasks: tuple[str, ...],
        running: RunningPeak | None = None,
    ) -> None:
        self.llm = llm
        self.args = args
        self.start_s = start_s
        self.tasks = tasks  # what the model serves: generate, embed, classify, ...
        self.running = running or RunningPeak()
        self._tokenizer: Tokenizer | None = None
        self.vllm_version = vllm_version()
        self.toolchain = toolchain()

    def shape(self) -> EngineShape:
        """The running engine's limits that a profile depends on."""
        from vllm.renderers.chat_utils import load_chat_template

        args = self.args
        template = load_chat_template(args.chat_template) if args.chat_template else None
        template = template or getattr(self.llm.tokenizer, "chat_template", None)
        takes_tools = isinstance(template, str) and "tools" in template
        model_config = self.llm.model_config
        return replace(
            _shape(self.llm.vllm_config, args),
            chat_template_tools=takes_tools,
            endpoints=served_endpoints(self.tasks, model_config),
            multimodal=bool(model_config.is_multimodal_model),
        )

    def tokenizer(self) -> Tokenizer:
        """A copy of the model's tokenizer, llmwarm's own: the warm-up tokenizes in a thread,
        and vLLM's frontend uses its own in threads too (a Rust tokenizer used by two threads
        at once can fail with "Already borrowed")."""
        if self._tokenizer is None:
            tok = self.llm.tokenizer
            if tok is None:
                raise StartupError(
                    "the engine has no tokenizer (--skip-tokenizer-init?); llmwarm needs one "
                    "for prompts"
                )
            self._tokenizer = cast("Tokenizer", copy.deepcopy(tok))
        return self._tokenizer

    def is_dead(self) -> bool:
        # vLLM's own test, the one its error handler and its new requests see: the core
        # client's monitor flagged the EngineCore dead, or the output handler ended. Reading
        # it here too means every path notices a death at the same moment.
        return bool(self.llm.errored)

    def dead_reason(self) -> str:
        return str(self.llm.dead_error) or "the EngineCore process ended"

    async def build_app(self, stop: VllmStop) -> ASGIApp:
        """vLLM's OpenAI-compatible app on this engine (`frontend.vllm_app`)."""
        return await frontend.vllm_app(self.llm, self.args, self.tasks, stop)

    def app_lifespan(self, app: ASGIApp) -> AbstractAsyncContextManager[None]:
        """vLLM's app lifespan (`frontend.vllm_lifespan`)."""
        return frontend.vllm_lifespan(app)

    def config_hash(self) -> str:
        """vLLM's hash of the configuration that shapes the compiled graph (keys its caches)."""
        return str(self.llm.vllm_config.compute_hash())

    @property
    def _counts_jit(self) -> bool:
        return bool(self.args.worker_extension_cls == jitmon.QUALNAME)

    async def _every_worker(self, method: str, *args: Any) -> list[Any]:
        """Call `method` on every worker of every engine this server fronts: vLLM's own
        `collective_rpc` answers with the first engine's workers only under data parallelism."""
        core = self.llm.engine_core
        _, balanced = _dp_ranks(self.llm.vllm_config.parallel_config)
        if balanced:  # vLLM's load-balancing client: an engine a rank
            per_engine = await core.call_utility_all_async(
                "collective_rpc", method, None, args, None
            )
            return [worker for workers in per_engine for worker in workers]
        return list(await self.llm.collective_rpc(method, args=args))

    async def jit_phase(self, phase: str) -> None:
        """Tell the workers' JIT-monitor counter (`llmwarm.backend.jitmon`) what llmwarm is doing:
        `warmup` (events counted, never raised) or `serving` (the user's mode applies)."""
        if self._counts_jit:
            await self._every_worker("llmwarm_jit_phase", phase)

    async def jit_events(self) -> JitEvents | None:
        """The monitor's events by phase; None without the counter (the user gave their own
        --worker-extension-cls)."""
        if not self._counts_jit:
            return None
        return combined(await self._every_worker("llmwarm_jit_events"))

    def take_running_peak(self) -> int | None:
        """The most requests vLLM's scheduler ran at once since the last call (None: vLLM
        reported nothing, e.g. `--disable-log-stats`)."""
        return self.running.take()


def combined(workers: list[dict[str, Any]]) -> JitEvents:
    """Every worker's JIT events, as the engine's: the tensor-parallel ranks of a pipeline
    stage compile the same kernels (the most any of them saw), different stages and
    data-parallel engines their own (summed)."""
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for worker in workers:
        groups.setdefault((worker.get("engine", 0), worker.get("stage", 0)), []).append(worker)

    def total(phase: str) -> int:
        return sum(max(w.get(phase, 0) for w in group) for group in groups.values())

    return JitEvents(
        active=any(w["active"] for w in workers),
        warmup=total("warmup"),
        serving=total("serving"),
        rewarm=total("rewarm"),
    )


PAUSE_ENV = "LLMWARM_TEST_PAUSE"  # tests only: pause at a named point (see `pause`)


def pause(point: str) -> None:
    """Tests only: with `LLMWARM_TEST_PAUSE=POINT`, say so on stderr and block 5 s at this
    point, so a test can signal the process there (a fixed sleep could miss it)."""
    if os.environ.get(PAUSE_ENV) == point:
        print(f"llmwarm: paused at {point}", file=sys.stderr, flush=True)
        time.sleep(5)


def _build(args: Namespace, cancelled: threading.Event, running: RunningPeak) -> AsyncLLM:
    """Build the engine (in a thread): config, process spawn, handshake. Gives up at the next
    step once `cancelled` is set."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import propagate_flash_late_interaction
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    vllm_args.count_jit_events(args)
    engine_args = AsyncEngineArgs.from_cli_args(args)
    propagate_flash_late_interaction(args, engine_args)
    try:
        config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    except Exception as exc:  # vLLM raises many types for a bad value of a flag
        raise VllmArgsError(
            "vLLM rejected the configuration", problems=_config_problems(exc)
        ) from exc
    pause("spawn")
    if cancelled.is_set():
        raise _Abandoned
    try:
        return AsyncLLM.from_vllm_config(
            vllm_config=config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            stat_loggers=[running.logger()],
            enable_log_requests=engine_args.enable_log_requests,
            aggregate_engine_logging=engine_args.aggregate_engine_logging,
            disable_log_stats=engine_args.disable_log_stats,
        )
    except Exception as exc:
        if cancelled.is_set():
            raise _Abandoned from exc
        problems = [("engine", str(exc) or repr(exc)), *_start_hints(config)]
        raise StartupError(f"the vLLM engine failed to start: {exc}", problems=problems) from exc


def _start_hints(config: Any) -> list[tuple[str, str]]:
    """What to set, for a start failure whose cause is known to need it."""
    from vllm.platforms import current_platform

    ranks = config.parallel_config.world_size
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    if current_platform.is_cpu() and ranks > 1 and bind == "auto":
        # vLLM's CPU build binds each rank to a NUMA node of its own by default, and refuses
        # ("Not enough allowed NUMA nodes") when there are fewer nodes than ranks
        lists = "|".join(str(i) for i in range(ranks))
        return [
            (
                "VLLM_CPU_OMP_THREADS_BIND",
                f"with {ranks} ranks on vLLM's CPU build and fewer "
                f"NUMA nodes, give each rank its cores, e.g. VLLM_CPU_OMP_THREADS_BIND='{lists}'",
            )
        ]
    return []


@asynccontextmanager
async def start_engine(
    args: Namespace, on_stage: Callable[[str], None] = lambda stage: None
) -> AsyncIterator[EngineClient]:
    """A V1 `AsyncLLM` for these arguments, shut down on exit whatever happened; `on_stage`
    hears each stage its worker begins while it loads (`llmwarm.backend.loading`).

    vLLM builds the engine synchronously (config, process spawn, a handshake wait of a minute
    or more). That runs in a thread, so the event loop keeps answering 503s meanwhile; a
    cancellation ends the engine's processes, which ends the thread's wait.
    """
    lifeline.arm()  # the engine's processes end with this one, even when it is SIGKILLed
    cancelled = threading.Event()
    started = time.perf_counter()
    running = RunningPeak()
    with loading.listening(on_stage):
        future = asyncio.get_running_loop().run_in_executor(None, _build, args, cancelled, running)
        try:
            engine = await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled.set()
            # The thread may be about to spawn the engine: keep ending children until it
            # returns.
            while not future.done():
                await asyncio.to_thread(_end_children)
                await asyncio.wait([future], timeout=0.5)
            if not future.cancelled() and future.exception() is None:
                future.result().shutdown()
            raise
    try:
        # Started lazily outside an event loop; start it now so an engine death during the
        # warm-up is noticed at once.
        engine._run_output_handler()
        await engine.reset_mm_cache()
        tasks = tuple(await engine.get_supported_tasks())
        yield Engine(engine, args, time.perf_counter() - started, tasks, running)
    finally:
        # Synchronous, as in vLLM's own engine context: in a thread, the still-running output
        # handler would see the engine die first and log a spurious EngineDeadError.
        engine.shutdown(timeout=engine.vllm_config.shutdown_timeout)


def run_headless(args: Namespace) -> None:
    """A secondary node (`--headless`): vLLM's own headless engines, and no API server, so
    nothing to warm or gate here: the llmwarm in front of the head node's API server warms
    these ranks through it (each request pinned to its rank). vLLM handles SIGTERM and SIGINT
    here; its processes end with this one whatever ends it (`llmwarm.lifeline`)."""
    from vllm.entrypoints.cli.serve import run_headless as vllm_headless

    lifeline.arm()
    args.api_server_count = 0
    logger.info(
        "--headless: this node runs engines only; the llmwarm on the head node "
        "(--data-parallel-address) warms their ranks and gates its API server on them"
    )
    try:
        vllm_headless(args)
    except (ValueError, TypeError) as exc:  # vLLM's own checks of a headless configuration
        raise VllmArgsError(
            "vLLM rejected the headless configuration", problems=_config_problems(exc)
        ) from exc


def served_endpoints(tasks: tuple[str, ...], model_config: Any) -> frozenset[str]:
    """The endpoints vLLM registers for a model with these tasks, decided as its own router
    registration decides (`vllm.entrypoints.launchers.api_server.routers`)."""
    from vllm.entrypoints.pooling.utils import enable_scoring_api

    served = {name for name, spec in SPECS.items() if spec.task in tasks}
    if model_config.get_pooling_task(tasks) is not None:
        served.add("pooling")
    if enable_scoring_api(tasks, model_config):
        served |= {"score", "rerank"}
    return frozenset(served)


def _dp_ranks(parallel: Any) -> tuple[tuple[int, ...], bool]:
    """The data-parallel ranks this API server fronts, and whether it balances over them
    (then a request can name its rank, `X-data-parallel-rank`, as vLLM's router reads it)."""
    size = int(parallel.data_parallel_size)
    if size <= 1:
        return (), False
    if parallel.data_parallel_external_lb:  # one API server per rank: its own
        return (int(parallel.data_parallel_rank),), False
    return tuple(range(size)), True  # every rank, on this node or a headless one


def _shape(config: Any, args: Namespace) -> EngineShape:
    compilation = config.compilation_config
    ranks, pinned = _dp_ranks(config.parallel_config)
    return EngineShape(
        max_model_len=int(config.model_config.max_model_len),
        max_num_seqs=int(config.scheduler_config.max_num_seqs),
        max_num_batched_tokens=int(config.scheduler_config.max_num_batched_tokens),
        cudagraph_capture_sizes=sorted(compilation.cudagraph_capture_sizes or []),
        lora=[module.name for module in args.lora_modules or []],
        lora_enabled=config.lora_config is not None,
        # vLLM sums the blocks of every engine it fronts; a warm-up fills one rank at a time
        kv_blocks=(config.cache_config.num_gpu_blocks or 0) // max(1, len(ranks)) or None,
        block_size=config.cache_config.block_size,
        dp_ranks=ranks,
        dp_pinned=pinned,
        spec_tokens=int(getattr(config.speculative_config, "num_speculative_tokens", 0) or 0),
        max_logprobs=int(config.model_config.max_logprobs),
    )


def shape_from_args(args: Namespace) -> EngineShape:
    """The same limits from the configuration alone, without starting an engine."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    try:
        config = AsyncEngineArgs.from_cli_args(args).create_engine_config(
            usage_context=UsageContext.OPENAI_API_SERVER
        )
    except Exception as exc:  # vLLM raises many types for a bad value of a flag
        raise VllmArgsError(
            "vLLM rejected the configuration", problems=_config_problems(exc)
        ) from exc
    return _shape(config, args)


def _device() -> str:
    """vLLM's platform, as a bake manifest records it."""
    import platform

    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return f"CPU ({platform.machine()})"
    name = current_platform.get_device_name()
    capability = current_platform.get_device_capability()
    if capability is None:
        return str(name)
    return f"{name} (compute capability {capability.major}.{capability.minor})"


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def _package(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _driver() -> str:
    """The GPU driver's version ("" without a GPU): what re-JITs PTX when it changes."""
    import torch

    if not torch.cuda.is_available():
        return ""
    try:
        version = int(torch._C._cuda_getDriverVersion())
    except (AttributeError, RuntimeError):
        return ""
    return f"{version // 1000}.{version % 1000 // 10}"


def toolchain() -> dict[str, str]:
    """What decides whether compiled kernels can be reused, besides vLLM's configuration hash,
    as a bake manifest records it (`llmwarm.backend.caches.TOOLCHAIN`)."""
    import torch

    return {
        "device": _device(),
        "torch_version": _torch_version(),
        "cuda_version": str(torch.version.cuda or getattr(torch.version, "hip", None) or ""),
        "driver_version": _driver(),
        "triton_version": _package("triton"),
        "flashinfer_version": _package("flashinfer-python"),
    }


def vllm_version() -> str:
    from vllm.version import __version__

    return str(__version__)
