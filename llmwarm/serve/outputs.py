"""What a serving process writes besides its HTTP answers, and the learn files it reads: the
report and its plot, the learn file (from time to time), a bake's manifest. A file `warm` or
`bake` exists to write fails them; a server logs a failed write, counts it
(`llmwarm_write_failures_total`) and serves on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable

from llmwarm import __version__
from llmwarm.backend import caches, engine
from llmwarm.errors import WriteError, render
from llmwarm.model.report import Report, write_json
from llmwarm.serve.display import plot
from llmwarm.serve.settings import Settings
from llmwarm.serve.state import RunState
from llmwarm.traffic import learn
from llmwarm.traffic.coverage import MAX_SHAPES, Coverage

logger = logging.getLogger(__name__)


async def keep_learning(
    write: Callable[[], Awaitable[None]], every: float = learn.WRITE_EVERY_S
) -> None:
    """While serving, write the learn file from time to time (when traffic changed it)."""
    while True:
        await asyncio.sleep(every)
        await write()


def write_report(report: Report, settings: Settings, state: RunState) -> None:
    """Write the report (and plot), each atomically. A file that cannot be written (full
    disk) fails `warm` and `bake`, whose product it is; a server logs it, counts it and serves
    on (the previous file is intact, and `/warmup/report` has the report)."""
    try:
        if settings.report_path is not None:
            write_json(report, settings.report_path)
            logger.info("warm-up report written to %s", settings.report_path)
        if settings.plot_path is not None and report.buckets:
            plot(report, settings.plot_path)
            logger.info("warm-up plot written to %s", settings.plot_path)
    except WriteError as exc:
        if not settings.serve:
            raise
        state.write_failures["report"] += 1
        logger.error("%s; serving on", "\n".join(render(exc.message, exc.problems)))


def manifest(
    settings: Settings, eng: engine.EngineClient, warmup_s: float | None = None
) -> caches.Manifest:
    """The running engine's manifest: what a bake of it records."""
    return caches.Manifest.model_validate(
        {
            **eng.toolchain,
            "llmwarm_version": __version__,
            "vllm_version": eng.vllm_version,
            "model": settings.model,
            "config_hash": eng.config_hash(),
            "engine_start_s": eng.start_s,
            "warmup_s": warmup_s,
            "capture_sizes": settings.capture,
        }
    )


async def write_learned(state: RunState, settings: Settings) -> None:
    """The learn file, when traffic changed it (in a thread: a slow disk, an fsync); a failed
    write is logged and counted (serving goes on, the next write tries again)."""
    path, coverage = settings.learn_path, state.coverage
    if path is None or not coverage.changed:
        return
    coverage.changed = False
    shapes = coverage.own_shapes()
    try:
        await asyncio.to_thread(learn.write, learn.own_file(path), shapes, settings.model)
    except WriteError as exc:
        coverage.changed = True
        state.write_failures["learn"] += 1
        logger.error("%s", "\n".join(render(exc.message, exc.problems)))
        return
    logger.info("learn file written: %s", path)


def read_learned(settings: Settings, coverage: Coverage) -> bool:
    """The learn files' counts into the coverage; whether this replica's own may be written."""
    if settings.learn_path is None:
        return False
    read = learn.read(settings.learn_path)
    # a fleet's files may hold more shapes than a process keeps: the most requested
    coverage.history = Counter(dict(read.counts.most_common(MAX_SHAPES)))
    coverage.own = read.own
    if read.counts:
        logger.info(
            "learn files %s (%d): %d requests in %d shapes", settings.learn_path, read.files,
            sum(read.counts.values()), len(read.counts),
        )  # fmt: skip
    return read.writable
