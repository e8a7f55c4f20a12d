"""The warm-up report: a versioned model, its JSON file, and a terminal table."""

from __future__ import annotations

import statistics
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, Field, computed_field
from rich.table import Table

REPORT_VERSION = 1


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


class Sample(BaseModel):
    """One warm-up request as the client saw it."""

    kind: str = Field(description="Endpoint and streaming mode, e.g. `chat-stream`.")
    ttft_s: float | None = Field(description="Time to first token (streamed requests only).")
    tpot_s: float | None = Field(
        description="Time per output token after the first (streamed requests only)."
    )
    e2e_s: float = Field(description="Request sent to last byte received.")
    prompt_tokens: int | None = Field(description="Prompt tokens, as the server counted them.")
    output_tokens: int | None = Field(description="Output tokens, as the server counted them.")


class RoundResult(BaseModel):
    round: int = Field(description="1-based; round 1 is the cold one.")
    samples: list[Sample]

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


class BucketResult(BaseModel):
    name: str
    prompt_tokens: int
    concurrency: int
    max_tokens: int
    rounds: list[RoundResult] = Field(default_factory=list)

    def first(self, metric: str) -> float | None:
        """The metric's median in the cold first round."""
        return getattr(self.rounds[0], metric) if self.rounds else None

    def steady(self, metric: str) -> float | None:
        """Median of the per-round medians after the first round."""
        return _median([getattr(r, metric) for r in self.rounds[1:]])


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
    prefix_cache_reset: bool = Field(
        description="Whether vLLM's prefix cache was emptied after the warm-up."
    )
    buckets: list[BucketResult]

    def summary(self) -> dict[str, object]:
        """A short form for `/ready`."""
        return {
            "model": self.model,
            "engine_start_s": round(self.engine_start_s, 3),
            "warmup_s": round(self.warmup_s, 3),
            "requests": self.requests,
            "buckets": len(self.buckets),
        }


def write_json(report: Report, path: Path) -> None:
    path.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _ratio(first: float | None, steady: float | None) -> str:
    if first is None or not steady:
        return "-"
    return f"{first / steady:.2f}x"


def table(report: Report) -> Table:
    """First (cold) round against the steady rounds, per bucket, in milliseconds."""
    t = Table(
        title=f"llmwarm warm-up: {report.requests} requests in {report.warmup_s:.1f} s "
        f"(engine start {report.engine_start_s:.1f} s)",
        title_justify="left",
    )
    t.add_column("bucket")
    t.add_column("rounds", justify="right")
    for label in ("TTFT", "TPOT", "e2e"):
        t.add_column(f"{label} first", justify="right")
        t.add_column(f"{label} steady", justify="right")
    t.add_column("e2e first/steady", justify="right")
    for b in report.buckets:
        cells = [b.name, str(len(b.rounds))]
        for metric in ("ttft_median_s", "tpot_median_s", "e2e_median_s"):
            cells += [_ms(b.first(metric)), _ms(b.steady(metric))]
        cells.append(_ratio(b.first("e2e_median_s"), b.steady("e2e_median_s")))
        t.add_row(*cells)
    return t
