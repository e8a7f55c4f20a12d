"""The warm-up: drive a started engine through its own HTTP server until it is warm.

    WarmupRun(...)(profile, source, trigger) -> Report      one warm-up, failed or not
      served_adapters   the LoRA adapters listed now (re-warms)
      fill_kv           prefill a share of the KV cache once
      prefill.sweep     a prompt of each prefill token count once (`llmwarm.warmup.prefill`)
      rounds            bucket by bucket, round by round, until each converges (or limits)
      unless_dead       all of it, cancelled the moment the engine dies

Progress goes to a `Record` as it happens (the server's run state, `llmwarm.serve.state`, for
`/ready`, the 503 bodies and `/metrics`); the report is built by `llmwarm.model.report`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol, TypeVar

from llmwarm.backend import engine
from llmwarm.errors import WarmupError
from llmwarm.model import convergence, corpus
from llmwarm.model.corpus import Corpus
from llmwarm.model.fit import EngineShape, for_engine, with_adapters
from llmwarm.model.kinds import Kind
from llmwarm.model.profile import Bucket, Profile
from llmwarm.model.report import (
    BucketResult,
    KvFillResult,
    Origin,
    Outcome,
    PrefillResult,
    Report,
    RoundResult,
    Sample,
    Trigger,
)
from llmwarm.traffic import learn
from llmwarm.warmup import prefill
from llmwarm.warmup.client import Client
from llmwarm.warmup.progress import Progress, ProgressView, WarmupProgress
from llmwarm.warmup.sampler import send_logprob_classes

if TYPE_CHECKING:
    from llmwarm.traffic.coverage import Coverage

_T = TypeVar("_T")

logger = logging.getLogger(__name__)


async def served_adapters(client: Client, model: str) -> list[str]:
    """The LoRA adapters the server lists now (`/v1/models` entries with a parent: the base
    model), including those loaded at run time with `/v1/load_lora_adapter`."""
    try:
        listed = (await client.get_json("/v1/models"))["data"]
    except (WarmupError, KeyError, TypeError) as exc:
        raise WarmupError(
            "cannot list the served LoRA adapters", problems=[("GET /v1/models", str(exc))]
        ) from None
    return [m["id"] for m in listed if m.get("parent") and m["id"] != model]


async def _round(
    client: Client, requests: Corpus, bucket: Bucket, round_: int, wanted: int
) -> list[Sample]:
    """One round: the round kind's batch, again (prompts as `Corpus.prompts_of` says) until
    `wanted` batches have a value of the metric. Batches, not requests: the requests of one
    batch run at the same moment, and their spread says nothing of how the next moment
    differs (see `corpus.sampled_batches`)."""
    field = f"{requests.profile.convergence.metric}_s"
    samples: list[Sample] = []
    sent = carrying = 0  # batches sent; those with a value of the metric
    for repeat in range(wanted):
        # made in a thread: tokenizing a wide batch of long prompts took the loop for a second
        batches = await asyncio.to_thread(requests.round_batches, bucket, round_, repeat)
        for batch in batches:
            got = await client.measure_all(batch.requests)
            samples += [s.model_copy(update={"batch": sent}) for s in got]
            sent += 1
            carrying += any(getattr(s, field) is not None for s in got)
        if carrying >= wanted or not batches:
            break
    return samples


async def _sweep(
    client: Client, requests: Corpus, bucket: Bucket, after: int, sent: set[Kind]
) -> RoundResult | None:
    """The bucket's sweep kinds (what of its endpoints, modes and features the warm-up has not
    `sent` yet), all at once, after round `after`; None when it has none."""
    sweep = await asyncio.to_thread(requests.sweep_requests, bucket, after, sent)
    if not sweep:
        return None
    return RoundResult(round=after, samples=await client.measure_all(sweep))


async def rounds(
    client: Client,
    requests: Corpus,
    *,
    on_round: Callable[[Progress], None] = lambda progress: None,
    running: Callable[[], int | None] = lambda: None,
    optional_seconds: float | None = None,
    ranks: Sequence[int | None] = (None,),
    pinned: bool = False,
) -> Outcome:
    """Warm bucket by bucket, round by round, until each converges (or the limits hit);
    under data parallelism, rank by rank (`ranks`), each request pinned to its rank when the
    server balances over them (`pinned`; see `EngineShape.dp_ranks`).

    A round repeats the bucket's first endpoint, plain, streamed for TTFT and TPOT (its shape
    must settle), with as many batches as `corpus.sampled_batches` says; the kinds no earlier
    bucket sent (other endpoints, modes and features) go all at once after round 1 (the
    sweep: each cold path, paid once) and, if the profile asks, after its last round (the
    check: still warm). `running` gives the engine's largest running count
    since its last call: read around each round, it says how many of a bucket's requests the
    engine really batched.
    Optional buckets run while these rounds are within `optional_seconds`, the required
    buckets' time included (those always run): one the time does not reach is `skipped`, one
    it cuts `budget` (the warm-up stays converged).
    """
    return await _Rounds(
        client, requests, on_round, running, optional_seconds, list(ranks), pinned
    ).run()


@dataclass
class _Rounds:
    """One warm-up's rounds: what `rounds` runs, and what it has counted so far."""

    client: Client
    requests: Corpus
    on_round: Callable[[Progress], None]
    running: Callable[[], int | None]
    optional_seconds: float | None
    ranks: list[int | None]
    pinned: bool
    sent: int = 0
    budget_exhausted: bool = False
    # the kinds each rank's buckets have sent so far: a later bucket sweeps only new ones
    kinds_sent: dict[int | None, set[Kind]] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)

    async def run(self) -> Outcome:
        buckets = [(rank, b) for rank in self.ranks for b in self.requests.profile.buckets]
        results = [
            BucketResult(
                name=b.name, rank=rank, prompt_tokens=b.prompt_tokens,
                concurrency=b.concurrency, max_tokens=b.max_tokens, optional=b.optional,
            )
            for rank, b in buckets
        ]  # fmt: skip
        for index, ((rank, bucket), result) in enumerate(zip(buckets, results, strict=True), 1):
            requests = replace(self.requests, rank=rank if self.pinned else None)
            where = Progress(index, len(buckets), result, 0, 0, False)
            cut = await self._bucket(requests, bucket, result, where)
            await self._finish(requests, bucket, result, cut)
            done = [*result.rounds, *([result.sweep] if result.sweep else [])]
            self._kinds_sent(rank).update(s.kind for r in done for s in r.samples)
        return Outcome(buckets=results, requests=self.sent, budget_exhausted=self.budget_exhausted)

    def _kinds_sent(self, rank: int | None) -> set[Kind]:
        return self.kinds_sent.setdefault(rank, set())

    def _out_of_budget(self) -> bool:
        budget = self.requests.profile.budget
        elapsed = time.perf_counter() - self.start
        out_of_time = budget.max_seconds is not None and elapsed >= budget.max_seconds
        out_of_requests = budget.max_requests is not None and self.sent >= budget.max_requests
        self.budget_exhausted |= out_of_time or out_of_requests
        return self.budget_exhausted

    def _optional_cut(self, bucket: Bucket) -> bool:
        limit = self.optional_seconds
        return bucket.optional and limit is not None and time.perf_counter() - self.start >= limit

    async def _bucket(
        self, requests: Corpus, bucket: Bucket, result: BucketResult, where: Progress
    ) -> bool:
        """Its rounds until it converges (or a limit); whether the optional time cut it."""
        rule = requests.profile.convergence
        wanted = corpus.sampled_batches(None)
        for round_ in range(1, rule.max_rounds + 1):
            if self._out_of_budget():
                return False
            if self._optional_cut(bucket):
                return True
            self.running()  # from this round on
            samples = await _round(self.client, requests, bucket, round_, wanted)
            if (peak := self.running()) is not None:
                result.max_running = max(result.max_running or 0, peak)
            self.sent += len(samples)
            repeats = requests.prompts_of(round_)
            result.rounds.append(RoundResult(round=round_, samples=samples, repeats=repeats))
            if round_ == 1:
                sent = self._kinds_sent(result.rank)
                result.sweep = await _sweep(self.client, requests, bucket, 1, sent)
                self.sent += len(result.sweep.samples) if result.sweep else 0
            verdict = convergence.check(result.values(rule.metric), rule)
            result.noise = verdict.noise
            wanted = max(wanted, corpus.sampled_batches(verdict))
            logger.debug("bucket %s round %d: %s", result.key, round_, verdict.reason)
            if verdict.converged:
                result.converged_at = round_
            done = verdict.converged or round_ == rule.max_rounds
            self.on_round(replace(where, round=round_, requests=self.sent, bucket_done=done))
            if verdict.converged:
                break
        return False

    async def _finish(
        self, requests: Corpus, bucket: Bucket, result: BucketResult, cut: bool
    ) -> None:
        """The check (its sweep again, if the profile asks) unless a limit stopped it, and why
        its rounds ended."""
        if requests.profile.check and result.sweep and not (self.budget_exhausted or cut):
            last = len(result.rounds)
            sent = self._kinds_sent(result.rank)
            result.check = await _sweep(self.client, requests, bucket, last, sent)
            self.sent += len(result.check.samples) if result.check else 0
        if result.converged:
            result.stop_reason = "converged"
        elif cut and not result.rounds:
            result.stop_reason = "skipped"
        elif cut or self.budget_exhausted:
            result.stop_reason = "budget"
        else:
            result.stop_reason = "max_rounds"
        if result.max_in_flight is not None and result.max_in_flight < bucket.concurrency:
            logger.warning(
                "bucket %s asked for %d requests at once; at most %d were in flight",
                result.key, bucket.concurrency, result.max_in_flight,
            )  # fmt: skip


async def fill_kv(
    client: Client,
    requests: Corpus,
    shape: EngineShape,
    *,
    on_batch: Callable[[int, int], None] = lambda done, target: None,
) -> KvFillResult | None:
    """Prefill `kv_fill.share` of the KV-cache blocks once, with distinct long prompts.

    Distinct prompts share no prefix, and the prefix cache keeps finished requests' blocks
    while free ones remain, so every new request lands on blocks not used before.
    """
    profile = requests.profile
    fill = profile.kv_fill
    if fill is None or not shape.kv_blocks or not shape.block_size:
        return None
    length = fill.prompt_tokens or min(shape.max_model_len - 8, 4096)
    target = int(fill.share * shape.kv_blocks)
    need_tokens = target * shape.block_size
    width = min(fill.concurrency, shape.max_num_seqs)
    kind = Kind(profile.endpoint_names()[0])  # the first served one, plain
    start = time.perf_counter()
    prefilled = sent = batches = 0
    while prefilled < need_tokens:
        batches += 1  # each batch its own "round": fresh prompts, no shared prefixes
        # No more requests than the blocks still to reach need: the last batch is trimmed.
        size = min(width, -(-(need_tokens - prefilled) // length))
        bucket = Bucket(prompt_tokens=length, concurrency=size, max_tokens=1, name="kv-fill")
        batch = await asyncio.to_thread(requests.batch, bucket, kind, batches)
        samples = await client.measure_all(batch.requests)
        sent += len(samples)
        prefilled += sum(s.prompt_tokens or length for s in samples)
        on_batch(min(target, prefilled // shape.block_size), target)
    return KvFillResult(
        blocks=shape.kv_blocks,
        block_size=shape.block_size,
        target_blocks=target,
        blocks_reached=min(shape.kv_blocks, prefilled // shape.block_size),
        tokens_prefilled=prefilled,
        requests=sent,
        seconds=time.perf_counter() - start,
    )


def died_warming(eng: engine.EngineClient) -> WarmupError:
    """The error of an engine that died before the gate opened: the warm-up failed (exit 4),
    whichever path noticed the death first."""
    return WarmupError(
        "the vLLM engine died during the warm-up", problems=[("engine", eng.dead_reason())]
    )


async def unless_dead(eng: engine.EngineClient, work: Awaitable[_T]) -> _T:
    """Await `work`; if the engine dies first (or meanwhile), a `WarmupError` saying so."""
    task = asyncio.ensure_future(work)
    dead = asyncio.create_task(engine.wait_dead(eng))
    try:
        await asyncio.wait({task, dead}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        dead.cancel()
        if not task.done():  # the engine died, or we are cancelled (a signal)
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if not eng.is_dead():
        return task.result()  # the result, or the failure of a request on a live engine
    # (retrieved: a request that failed because the engine died)
    failed = not task.cancelled() and task.exception() is not None
    by = "the engine watchdog" if task.cancelled() else "a warm-up request" if failed else "none"
    logger.info("the engine died during the warm-up; first noticed by: %s", by)
    raise died_warming(eng)


@dataclass
class Before:
    """What a warm-up sent before its buckets, every rank's."""

    kv: KvFillResult | None = None
    prefill: PrefillResult | None = None
    logprob_classes: list[int] = field(default_factory=list)
    prompt_logprob_classes: list[int] = field(default_factory=list)

    def seconds(self) -> float:
        return (self.kv.seconds if self.kv else 0) + (self.prefill.seconds if self.prefill else 0)

    def log(self) -> None:
        kv, swept = self.kv, self.prefill
        if kv is not None:
            logger.info(
                "KV-cache fill: %d of %d blocks prefilled once (%d requests, %.1f s)",
                kv.blocks_reached, kv.blocks, kv.requests, kv.seconds,
            )  # fmt: skip
        if swept is not None:
            logger.info(
                "prefill sweep: %d token counts from %d to %d, alone and %d at once "
                "(%d requests, %.1f s)%s", len(swept.token_counts), swept.token_counts[0],
                swept.token_counts[-1], swept.batched, swept.requests, swept.seconds,
                f"; {len(swept.cut)} longer counts cut (up to {swept.cut[-1]}), past its share "
                "of the engine's start time" if swept.cut else "",
            )  # fmt: skip
        for name, counts in (
            ("top_logprobs", self.logprob_classes),
            ("prompt_logprobs", self.prompt_logprob_classes),
        ):
            if counts:
                logger.info(
                    "log-probability widths: %s %s, one request at a time",
                    name, ", ".join(map(str, counts)),
                )  # fmt: skip


class Record(Protocol):
    """Where a warm-up reports as it goes, and reads the live traffic's shapes: the server's
    run state (`llmwarm.serve.state.RunState`), their one writer."""

    coverage: Coverage
    warmup: WarmupProgress

    def begin_warmup(self, window: int) -> WarmupProgress: ...

    def warmup_ended(self, report: Report) -> None: ...


@dataclass
class WarmupRun:
    """Warm-ups of one started engine, through one client of its own server (its own
    process: `llmwarm.warmup.client`)."""

    engine: engine.EngineClient
    state: Record
    origin: Origin
    client: Client
    learn_file: str | None = None  # extend each profile with the shapes live traffic needed

    async def __call__(self, profile: Profile, source: str, trigger: Trigger) -> Report:
        """One warm-up; its report, also when it failed (then with `error` set).

        A profile that does not fit the engine raises `ProfileError` before any request.
        """
        shape = self.engine.shape()
        if trigger != "startup":  # also every adapter loaded since (/v1/load_lora_adapter)
            adapters = await served_adapters(self.client, self.origin.model)
            shape = replace(shape, lora=adapters)
            if trigger == "api":
                profile = with_adapters(profile, adapters)
        profile = for_engine(profile, shape)
        learned = None
        if self.learn_file is not None and trigger != "adapter":  # (an adapter's: its own)
            counts = self.state.coverage.all_shapes()
            # (each learned shape is a profile checked against the engine: off the loop)
            profile, learned = await asyncio.to_thread(
                learn.extend, profile, counts, shape, self.learn_file
            )
        live = self.state.begin_warmup(profile.convergence.window)
        if trigger == "startup":  # (a re-warm's phase is its owner's: `llmwarm.serve.rewarm`)
            await self.engine.jit_phase("warmup")  # a compile now is what a warm-up is for
        # A salt of this run's own: its prefix-cache blocks match no other request.
        requests = Corpus(
            profile,
            self.engine.tokenizer(),
            self.origin.model,
            f"llmwarm-{secrets.token_hex(8)}",
        )
        try:
            outcome, before = await unless_dead(self.engine, self._warm(requests, shape))
        except WarmupError as exc:
            report = Report.failed(
                self.origin, profile=profile, source=source, trigger=trigger,
                buckets=list(live.buckets.values()), requests=live.requests,
                seconds=live.elapsed() or 0.0, error=exc, endpoints=shape.endpoints,
            )  # fmt: skip
        else:
            jit = await self.engine.jit_events()
            report = Report.build(
                self.origin, profile=profile, source=source, trigger=trigger, outcome=outcome,
                seconds=live.seconds or 0.0, kv_fill=before.kv, prefill=before.prefill,
                logprob_classes=before.logprob_classes,
                prompt_logprob_classes=before.prompt_logprob_classes, cache_salt=requests.salt,
                jit=jit, learned=learned, endpoints=shape.endpoints,
            )  # fmt: skip
        self.state.warmup_ended(report)
        return report

    async def _warm(self, requests: Corpus, shape: EngineShape) -> tuple[Outcome, Before]:
        profile = requests.profile
        live = self.state.warmup
        ranks = shape.ranks()
        optional = sum(b.optional for b in profile.buckets) * len(ranks)
        live.planned = len(profile.buckets) * len(ranks) - optional
        view = ProgressView(live.planned, profile.convergence.metric, optional=optional)

        def on_round(p: Progress) -> None:
            live.buckets[p.bucket.key] = p.bucket
            live.requests = p.requests
            live.planned = max(live.planned, p.bucket_index)  # an optional bucket that runs
            live.done = p.bucket_index - (0 if p.bucket_done else 1)
            live.where = {
                "bucket": p.bucket_index, "buckets": p.buckets, "name": p.bucket.key,
                "round": p.round, "requests": p.requests,
            }  # fmt: skip
            view.update(p)

        before = await self._before_buckets(requests, shape, live)
        with view:
            # the share bounds the whole warm-up: what ran before the buckets counts too
            share = profile.budget.optional_share
            optional_seconds = None
            if share is not None:
                optional_seconds = share * self.origin.engine_start_s - before.seconds()
            outcome = await rounds(
                self.client, requests, on_round=on_round,
                running=self.engine.take_running_peak,
                optional_seconds=optional_seconds, ranks=ranks, pinned=shape.dp_pinned,
            )  # fmt: skip
        live.seconds = live.elapsed()
        return outcome, before

    async def _before_buckets(
        self, requests: Corpus, shape: EngineShape, live: WarmupProgress
    ) -> Before:
        """Rank by rank (each rank's KV cache and kernels are its own): the KV-cache fill, the
        prefill sweep, the sampler's log-probability widths."""

        def on_fill(blocks: int, target: int) -> None:
            live.where = {"kv_fill": {"blocks": blocks, "target": target}}

        done = Before()
        start_s = self.origin.engine_start_s  # the prefill sweep's time is a share of it
        for rank in shape.ranks():
            pinned = replace(requests, rank=rank if shape.dp_pinned else None)
            kv = await fill_kv(self.client, pinned, shape, on_batch=on_fill)
            done.kv = KvFillResult.add(done.kv, kv)
            if requests.profile.prefill is not None:
                live.where = {"prefill": {"rank": rank}}
            swept = await prefill.sweep(self.client, pinned, shape, start_s)
            done.prefill = PrefillResult.add(done.prefill, swept)
            widths = await send_logprob_classes(self.client, pinned, shape)
            done.logprob_classes = widths.get("logprobs", [])
            done.prompt_logprob_classes = widths.get("prompt_logprobs", [])
        done.log()
        return done
