"""The warm-up report: a versioned model and its JSON file (`llmwarm.serve.display` shows it)."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, PlainSerializer, computed_field

from llmwarm import files
from llmwarm.errors import LlmwarmError, Problem
from llmwarm.model.convergence import Rule
from llmwarm.model.kinds import Kind, KindField
from llmwarm.model.profile import Profile

REPORT_VERSION = 2  # 2: `cache_salt` replaced `prefix_cache_reset`


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


class Sample(BaseModel):
    """One warm-up request as the client saw it."""

    kind: KindField = Field(
        description="Its request kind: endpoint, streaming mode and feature, e.g. "
        "`chat-stream+logprobs` (`llmwarm.model.kinds`)."
    )
    ttft_s: float | None = Field(
        description="Time to first token (streamed requests only; none where no event showed "
        "it: a Responses API stream whose output had no text)."
    )
    tpot_s: float | None = Field(
        description="Time per output token after the first (streamed requests only): of a "
        "batch sent at once, from the moment all its requests had their first token (their "
        "decode side by side, not another's prefill step)."
    )
    e2e_s: float = Field(description="Request sent to last byte received.")
    prompt_tokens: int | None = Field(description="Prompt tokens, as the server counted them.")
    output_tokens: int | None = Field(description="Output tokens, as the server counted them.")
    in_flight: int | None = Field(
        default=None,
        description="Requests of its batch on the wire when it was sent, itself included "
        "(from sending its headers; one waiting for a connection does not count).",
    )
    batch: int = Field(
        default=0,
        description="Which of its round's batches it was sent in (from 0). The requests of a "
        "batch run at the same moment, on the same engine steps: the convergence rule takes "
        "a batch as one sample of the host's noise, not as several.",
    )


class RoundResult(BaseModel):
    round: int = Field(description="1-based; round 1 is the cold one.")
    samples: list[Sample]
    repeats: int | None = Field(
        default=None,
        description="The earlier round whose prompts it sent again (round 2's, from round 3 "
        "on, when the rule measures decode: `tpot`): their prefill came from the prefix "
        "cache, so its TTFT and e2e are left out of the bucket's. None: prompts never sent.",
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ttft_median_s(self) -> float | None:
        return _median([s.ttft_s for s in self.samples])

    @computed_field  # type: ignore[prop-decorator]
    @property
    def tpot_median_s(self) -> float | None:
        return _median([s.tpot_s for s in self.samples])

    @computed_field  # type: ignore[prop-decorator]
    @property
    def e2e_median_s(self) -> float | None:
        return _median([s.e2e_s for s in self.samples])


METRIC_FIELDS = {"tpot": "tpot_median_s", "ttft": "ttft_median_s", "e2e": "e2e_median_s"}

StopReason = Literal["converged", "max_rounds", "budget", "skipped", "running", "failed"]
# What started a warm-up: the process's start, `POST /warmup/run`, or a LoRA adapter loaded at
# run time (`llmwarm.serve.lora`).
Trigger = Literal["startup", "api", "adapter"]


class Learned(BaseModel):
    """What a warm-up added to its profile from the learn file (`llmwarm.traffic.learn`)."""

    file: str = Field(description="The learn file.")
    buckets: list[str] = Field(description="Buckets added for shapes live traffic needed.")
    kinds: list[str] = Field(description="Request kinds added (endpoint x stream x feature).")


class BucketResult(BaseModel):
    name: str
    rank: int | None = Field(
        default=None,
        description="The data-parallel rank its requests ran on (vLLM's `engine` label); "
        "none without data parallelism.",
    )
    prompt_tokens: int
    concurrency: int
    max_tokens: int
    optional: bool = Field(
        default=False,
        description="Extra coverage (an `auto` bucket, or one marked `optional`): cut or "
        "skipped for time, it does not make the warm-up unconverged.",
    )
    rounds: list[RoundResult] = Field(default_factory=list)
    converged_at: int | None = Field(
        default=None, description="The round at which the convergence rule first held."
    )
    sweep: RoundResult | None = Field(
        default=None,
        description="The bucket's request features, every kind at once, after round 1 "
        "(each feature's cold path, paid once); `round` is the round it followed.",
    )
    check: RoundResult | None = Field(
        default=None,
        description="The same kinds at once again after the last round: still warm?",
    )
    max_running: int | None = Field(
        default=None,
        description="The most requests vLLM's scheduler ran at once during the bucket's rounds "
        "(its own count, beside `max_in_flight`, the client's); none where vLLM reports no "
        "stats (`--disable-log-stats`).",
    )
    noise: float | None = Field(
        default=None,
        description="Measured noise of its last window: the largest standard error of a round "
        "median, relative to their median (a noisy host shows here, not as non-convergence; "
        "none: not measured, one batch a round on a quiet host).",
    )
    stop_reason: StopReason = Field(
        default="running",
        description="Why its rounds ended: `converged`, `max_rounds`, `budget` (the "
        "warm-up's budget, of time or requests, ran out first), `skipped` (an optional bucket "
        "the time did not reach) or `failed` (the warm-up failed during this bucket; see the "
        "report's `error`).",
    )

    @property
    def converged(self) -> bool:
        return self.converged_at is not None

    @property
    def key(self) -> str:
        """Its name, with its rank under data parallelism (`short@rank1`)."""
        return self.name if self.rank is None else f"{self.name}@rank{self.rank}"

    @property
    def required(self) -> bool:
        """Whether the warm-up is unconverged without it: any bucket but an optional one that
        time cut or skipped."""
        return not (self.optional and self.stop_reason in ("budget", "skipped"))

    @computed_field  # type: ignore[prop-decorator]
    @property
    def max_in_flight(self) -> int | None:
        """The most requests its rounds really had on the wire at once (`concurrency` asked)."""
        seen = [s.in_flight for r in self.rounds for s in r.samples if s.in_flight is not None]
        return max(seen) if seen else None

    def values(self, metric: str) -> list[list[float]]:
        """Per round, one value of a metric (`tpot`, `ttft`, `e2e`) per batch that has it: the
        median over the batch's requests. Requests sent together share their moment (a
        neighbour's burst slows them all alike), so their spread is not the host's noise."""
        field = f"{metric}_s"
        per_round = []
        for r in self.rounds:
            batches: dict[int, list[float]] = {}
            for sample in r.samples:
                if (v := getattr(sample, field)) is not None:
                    batches.setdefault(sample.batch, []).append(v)
            per_round.append([statistics.median(v) for v in batches.values()])
        return per_round

    def measured(self, metric: str) -> list[tuple[int, float]]:
        """(round, median) of one metric (`tpot`, `ttft`, `e2e`), rounds that measured it: a
        round that sent an earlier round's prompts again measured decode (`tpot`) only."""
        return [
            (r.round, value)
            for r in self.rounds
            if (value := getattr(r, METRIC_FIELDS[metric])) is not None
            and (r.repeats is None or metric == "tpot")
        ]

    def series(self, metric: str) -> list[float]:
        """Per-round medians of one metric (`tpot`, `ttft`, `e2e`), rounds that measured it."""
        return [value for _, value in self.measured(metric)]

    def first(self, metric: str) -> float | None:
        """The metric's median in the cold first round."""
        return getattr(self.rounds[0], METRIC_FIELDS[metric]) if self.rounds else None

    def warm(self, metric: str, window: int) -> float | None:
        """Median of the per-round medians over the last `window` rounds after round 1 that
        measured it."""
        later = [value for round_, value in self.measured(metric) if round_ > 1]
        return _median(later[-window:])


class JitEvents(BaseModel):
    """vLLM's JIT monitor (GPU workers): the Triton, CuTe-DSL and TileLang kernel compiles it
    saw, by phase, since the engine started (`llmwarm.backend.jitmon`; FlashInfer and DeepGEMM
    builds, Inductor's kernels and Triton autotuning are not among them)."""

    active: bool = Field(
        description="Whether the monitor runs (vLLM switches it on in GPU workers only)."
    )
    warmup: int = Field(description="Events during llmwarm's warm-ups: what they caught.")
    serving: int = Field(description="Events after the gate opened: what they missed.")
    rewarm: int = Field(
        default=0,
        description="Events during re-warms with the gate open: a user's or the re-warm's, "
        "which an event does not tell (never raised in `error` mode).",
    )


class CaptureSizes(BaseModel):
    """The CUDA-graph capture sizes `--capture-sizes-from-profile` gave vLLM
    (`llmwarm.backend.capture`): each a graph captured at every start, so their count is the
    capture's cost."""

    sizes: list[int] = Field(description="Tokens per captured step, ascending.")
    default_count: int = Field(description="How many vLLM's default would capture here.")
    ceiling: int | None = Field(
        default=None,
        description="The largest step worth a graph: vLLM's default's largest size, or the "
        "widest decode step if wider, up to 1024 tokens (with decode-only graphs, the widest "
        "decode step vLLM runs, max_num_seqs x query); a larger one runs without a graph.",
    )
    default_largest: int | None = Field(
        default=None,
        description="vLLM's default's largest size: the graph pool grows with the largest "
        "captured step, so `sizes[-1]` against it is the pool's growth (modelled; a GPU "
        "measures it at start).",
    )
    padding: float = Field(
        description="The mean padding up to a graph of a step of each size up to the plan's "
        "ceiling, relative (0.05: 5 % more tokens computed than the step holds): what a step "
        "between the warmed ones pays; a step above the largest size runs without a graph."
    )
    default_padding: float | None = Field(
        default=None, description="The same for vLLM's default sizes, over the same steps."
    )
    warmed_padding: float | None = Field(
        default=None,
        description="The warmed steps' own mean padding, weighted by how often each occurs.",
    )
    uncaptured: list[int] = Field(
        default_factory=list,
        description="Warmed steps (tokens) above the ceiling: long prefills run without a "
        "graph, unpadded, as in vLLM's default, rather than paying a graph's memory and padding.",
    )


class KvFillResult(BaseModel):
    """What the KV-cache fill phase reached."""

    blocks: int = Field(description="KV-cache blocks the engine has (every rank's, summed).")
    block_size: int = Field(description="Tokens per block.")
    target_blocks: int = Field(description="Blocks the profile asked to prefill once.")
    blocks_reached: int = Field(
        description="Blocks prefilled, counted from the prompt tokens the server reported "
        "(distinct prompts; full blocks only)."
    )
    tokens_prefilled: int
    requests: int
    seconds: float

    @staticmethod
    def add(a: KvFillResult | None, b: KvFillResult | None) -> KvFillResult | None:
        """Two fills together (of two data-parallel ranks, each with its KV cache)."""
        if a is None or b is None:
            return a or b
        summed = {f: getattr(a, f) + getattr(b, f) for f in KvFillResult.model_fields}
        return KvFillResult(**{**summed, "block_size": a.block_size})


class PrefillResult(BaseModel):
    """What the prefill sweep sent (`llmwarm.warmup.prefill`)."""

    token_counts: list[int] = Field(
        description="Prompt token counts sent, each alone and (`batched`) shared at once."
    )
    batched: int = Field(description="Requests at once of a count's second request (1: none).")
    cut: list[int] = Field(
        default_factory=list,
        description="Longer counts not sent: each would have ended past the sweep's "
        "`max_share` of the engine's start time.",
    )
    requests: int = Field(description="Requests sent (every data-parallel rank's).")
    seconds: float

    @staticmethod
    def add(a: PrefillResult | None, b: PrefillResult | None) -> PrefillResult | None:
        """Two sweeps together (of two data-parallel ranks): the counts every rank was sent."""
        if a is None or b is None:
            return a or b
        sent = set(a.token_counts) & set(b.token_counts)
        return a.model_copy(
            update={
                "token_counts": sorted(sent),
                "cut": sorted({*a.token_counts, *a.cut, *b.token_counts, *b.cut} - sent),
                "requests": a.requests + b.requests,
                "seconds": a.seconds + b.seconds,
            }
        )


def _problem(value: Any) -> Any:
    return Problem(**value) if isinstance(value, dict) else value


# `errors.Problem`, as `{"where": ..., "message": ...}` in JSON.
ProblemField = Annotated[
    Problem, BeforeValidator(_problem), PlainSerializer(Problem.as_dict, return_type=dict)
]


class WarmupFailure(BaseModel):
    """Why a warm-up did not finish."""

    message: str
    problems: list[ProblemField] = Field(default_factory=list)

    @classmethod
    def of(cls, exc: LlmwarmError) -> WarmupFailure:
        return cls(message=exc.message, problems=exc.problems)


@dataclass(frozen=True)
class Origin:
    """What every report of one process shares."""

    llmwarm_version: str
    vllm_version: str
    model: str
    started_at: datetime
    engine_start_s: float
    on_unconverged: Literal["serve", "fail"]
    capture_sizes: CaptureSizes | None = None


@dataclass
class Outcome:
    """What a warm-up's rounds measured."""

    buckets: list[BucketResult]
    requests: int
    budget_exhausted: bool = False


class KindSummary(BaseModel):
    kind: KindField
    cold_e2e_s: float = Field(
        description="Median end-to-end latency in round 1 (a feature's kind: in the sweep)."
    )
    warm_e2e_s: float | None = Field(description="Median end-to-end latency when warm.")


class AdapterWarmup(BaseModel):
    """A LoRA adapter loaded at run time, and its warm-up (`llmwarm.serve.lora`)."""

    name: str
    loaded_at: datetime = Field(description="When vLLM answered its load (UTC).")
    warm_after_s: float = Field(
        description="Seconds from its load to its first request let through: its warm-up, "
        "and any warm-up it waited for."
    )
    warmup_s: float = Field(description="Seconds its own warm-up took.")
    requests: int = Field(description="Warm-up requests sent to it.")
    converged: bool
    kinds: list[KindSummary] = Field(description="Its request kinds, cold against warm.")
    error: WarmupFailure | None = Field(
        default=None, description="Set when its warm-up failed: it is served all the same."
    )


class Report(BaseModel):
    """What a warm-up did and measured."""

    version: int = REPORT_VERSION
    llmwarm_version: str
    vllm_version: str
    model: str
    profile: str = Field(description="Where the profile came from.")
    started_at: datetime = Field(description="When llmwarm started the engine (UTC).")
    engine_start_s: float = Field(description="Seconds from engine start to engine ready.")
    warmup_s: float = Field(description="Seconds the warm-up took.")
    requests: int = Field(description="Warm-up requests sent.")
    cache_salt: str | None = Field(
        default=None,
        description="The `cache_salt` every request of this warm-up carried: its prefix-cache "
        "blocks match no request without it (no user's), and nothing is reset after it.",
    )
    convergence: Rule = Field(description="The rule each bucket was held to.")
    on_unconverged: Literal["serve", "fail"] = Field(
        description="The policy for buckets that did not converge."
    )
    budget_exhausted: bool = Field(description="Whether the budget cut the warm-up short.")
    kv_fill: KvFillResult | None = Field(
        default=None, description="The KV-cache fill phase, when the profile asks for one."
    )
    prefill: PrefillResult | None = Field(
        default=None, description="The prefill sweep, when the profile asks for one."
    )
    logprob_classes: list[int] = Field(
        default_factory=list,
        description="`top_logprobs` counts sent one request at a time (to each data-parallel "
        "rank), one per kernel width vLLM's GPU sampler compiles (the next power of two of 1 + "
        "the count); empty when the profile warms no `logprobs`.",
    )
    prompt_logprob_classes: list[int] = Field(
        default_factory=list,
        description="`prompt_logprobs` counts sent the same way (a prompt's log-probabilities "
        "go through the same kernel); empty when the profile warms no `prompt_logprobs`.",
    )
    jit: JitEvents | None = Field(
        default=None,
        description="vLLM's JIT-monitor events by phase at the end of this warm-up (absent "
        "when llmwarm could not install its counter, e.g. with --worker-extension-cls).",
    )
    trigger: Trigger = Field(
        default="startup",
        description="`startup`, `api` for a re-warm asked for by `POST /warmup/run`, "
        "`adapter` for a LoRA adapter's loaded at run time.",
    )
    adapters: list[AdapterWarmup] = Field(
        default_factory=list,
        description="The LoRA adapters loaded at run time since the start, each with when it "
        "became warm (`llmwarm.serve.lora`).",
    )
    learned: Learned | None = Field(
        default=None,
        description="What the profile was extended with from live traffic (`--learn`).",
    )
    capture_sizes: CaptureSizes | None = Field(
        default=None,
        description="The CUDA-graph capture sizes llmwarm gave vLLM "
        "(`--capture-sizes-from-profile`), their count against vLLM's default, and the padding "
        "the warmed steps pay.",
    )
    error: WarmupFailure | None = Field(
        default=None,
        description="Set when the warm-up failed (a request failed, the engine died); "
        "the buckets then hold what was measured until then.",
    )
    endpoints: list[str] = Field(
        default_factory=list, description="The endpoints vLLM serves this model on."
    )
    features: list[str] = Field(
        default_factory=list, description="The profile's request features, as kinds name them."
    )
    optional_share: float | None = Field(
        default=None,
        description="The profile's `budget.optional_share`: how much of the engine's start "
        "time optional buckets may add (none: no such limit).",
    )
    buckets: list[BucketResult]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def converged(self) -> bool:
        """The warm-up finished and every bucket converged (optional ones: those it reached)."""
        return self.error is None and all(b.converged for b in self.buckets if b.required)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def kinds(self) -> list[KindSummary]:
        """Per request kind (endpoint x streaming x feature): round 1 against the warm rounds;
        a feature's kinds, its sweep against its check."""
        cold: dict[Kind, list[float]] = {}
        warm: dict[Kind, list[float]] = {}
        window = self.convergence.window
        for b in self.buckets:
            # Features: the sweep against the check (both sent at once, so comparable).
            for r in [*b.rounds[:1], *([b.sweep] if b.sweep else [])]:
                for sample in r.samples:
                    cold.setdefault(sample.kind, []).append(sample.e2e_s)
            for r in [*b.rounds[1:][-window:], *([b.check] if b.check else [])]:
                for sample in r.samples:
                    warm.setdefault(sample.kind, []).append(sample.e2e_s)
        return [
            KindSummary(
                kind=kind,
                cold_e2e_s=statistics.median(values),
                warm_e2e_s=statistics.median(warm[kind]) if kind in warm else None,
            )
            for kind, values in cold.items()
        ]

    @classmethod
    def build(
        cls,
        origin: Origin,
        *,
        profile: Profile,
        source: str,
        trigger: Trigger,
        outcome: Outcome,
        seconds: float,
        kv_fill: KvFillResult | None = None,
        prefill: PrefillResult | None = None,
        logprob_classes: Iterable[int] = (),
        prompt_logprob_classes: Iterable[int] = (),
        cache_salt: str | None = None,
        jit: JitEvents | None = None,
        learned: Learned | None = None,
        error: WarmupFailure | None = None,
        endpoints: Iterable[str] = (),
    ) -> Report:
        """The report of one warm-up of the process `origin` describes (`endpoints`: those
        vLLM serves this model on)."""
        return cls(
            **dataclasses.asdict(origin),
            profile=source,
            endpoints=sorted(endpoints),
            features=[str(f) for f in profile.features.features()],
            optional_share=profile.budget.optional_share,
            warmup_s=seconds,
            requests=outcome.requests,
            cache_salt=cache_salt,
            convergence=profile.convergence,
            budget_exhausted=outcome.budget_exhausted,
            kv_fill=kv_fill,
            prefill=prefill,
            logprob_classes=sorted(logprob_classes),
            prompt_logprob_classes=sorted(prompt_logprob_classes),
            jit=jit,
            learned=learned,
            trigger=trigger,
            error=error,
            buckets=outcome.buckets,
        )

    @classmethod
    def failed(
        cls,
        origin: Origin,
        *,
        profile: Profile,
        source: str,
        trigger: Trigger,
        buckets: list[BucketResult],
        requests: int,
        seconds: float,
        error: LlmwarmError,
        endpoints: Iterable[str] = (),
    ) -> Report:
        """The report of a warm-up that failed: what was measured until then."""
        for bucket in buckets:
            if bucket.stop_reason == "running":
                bucket.stop_reason = "failed"
        return cls.build(
            origin, profile=profile, source=source, trigger=trigger,
            outcome=Outcome(buckets, requests), seconds=seconds, error=WarmupFailure.of(error),
            endpoints=endpoints,
        )  # fmt: skip

    @property
    def unconverged(self) -> list[str]:
        return [b.key for b in self.buckets if b.required and not b.converged]

    def summary(self) -> dict[str, object]:
        """A short form for `/ready`."""
        return {
            "model": self.model,
            "engine_start_s": round(self.engine_start_s, 3),
            "warmup_s": round(self.warmup_s, 3),
            "requests": self.requests,
            "buckets": len(self.buckets),
            "converged": self.converged,
            "unconverged": self.unconverged,
        }


def write_json(report: Report, path: Path, option: str = "--report") -> None:
    files.write_text(path, report.model_dump_json(indent=2) + "\n", option)
