"""Live traffic in the warm-up's own terms: which requests the warm-up covered, and what the
misses cost the users who sent them.

Each user request that passes the open gate is described as a `Shape`: its kind
(`llmwarm.model.kinds`: endpoint, stream, features by the detectors `profile from-log` uses, one
feature table, and its adapter), and power-of-two classes of its prompt tokens (from the
answer's usage), output tokens and requests in flight at its arrival. Never its text.

A request is **covered** when the last warm-up (`Warmed`) sent every kind it needs (its
endpoint and streaming mode with each of its features: `chat-stream+logprobs`; with none, the
plain kind `chat-stream`), and its shape lies within the warmed range: its prompt class at most
the largest warmed bucket's (or the prefill sweep's longest prompt), its in-flight class at
most the widest warmed concurrency. A kind's own cold path (a logprobs kernel, a grammar
compiler) is paid once whatever the shape; the engine's latency at a shape is shared by every
kind: the warm-up is built the same way.

A **cold miss** is what an uncovered shape cost: its first request's latency (TTFT for streams,
end to end otherwise) over the median of its later ones. Pure: no vLLM, no HTTP.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
import statistics
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmwarm.model import corpus, endpoints
from llmwarm.model.features import Feature
from llmwarm.model.kinds import Kind
from llmwarm.traffic import fromlog

if TYPE_CHECKING:
    from llmwarm.model.profile import Profile
    from llmwarm.model.report import Report

LATER_KEPT = 255  # later latencies kept per uncovered shape, for their median
TAIL_BYTES = 2048  # the end of an answer kept to read its usage from
# What users' requests decide is bounded: distinct shapes kept (the learn file's rows; a request
# of a new shape past it is counted, covered or not, but its shape not kept), uncovered kinds
# told apart (a `/metrics` label value each; past it they share the kind "other"), and shapes
# kept per uncovered kind.
MAX_SHAPES = 4096
MAX_MISS_KINDS = 100
MAX_MISS_SHAPES = 64
OTHER = "other"

_USAGE = {
    "prompt": re.compile(rb'"(?:prompt_tokens|input_tokens)"\s*:\s*(\d+)'),
    "output": re.compile(rb'"(?:completion_tokens|output_tokens)"\s*:\s*(\d+)'),
}


@dataclass(frozen=True, order=True)
class Shape:
    """One kind of request at one size class, as live traffic or a learn file shows it."""

    kind: Kind  # its features as live traffic shows them: an image with no size
    prompt_tokens: int  # class
    concurrency: int  # class of the requests in flight at arrival
    max_tokens: int  # class

    @property
    def name(self) -> str:
        return f"{self.kind} p{self.prompt_tokens}-c{self.concurrency}-o{self.max_tokens}"


@dataclass(frozen=True)
class Warmed:
    """What a warm-up sent: its kinds (an image of any size covers an image request), and the
    widest shape any bucket reached (its prompt, or the prefill sweep's longest)."""

    kinds: frozenset[Kind]
    prompt_tokens: int
    concurrency: int

    @classmethod
    def of(cls, buckets: Iterable[tuple[int, int, Iterable[Kind]]]) -> Warmed:
        """From (prompt tokens, concurrency, kinds) per bucket that ran."""
        kinds: set[Kind] = set()
        prompt = concurrency = 0
        for p, c, sent in buckets:
            kinds |= {k.general() for k in sent}
            prompt, concurrency = max(prompt, p), max(concurrency, c)
        return cls(frozenset(kinds), prompt, concurrency)

    @classmethod
    def from_report(cls, report: Report) -> Warmed:
        """What its buckets sent; under data parallelism, what every rank was sent (a user's
        request may land on any of them: the ranks count as one server). The prefill sweep
        (`llmwarm.warmup.prefill`) sent every rank a prompt of each prefill token count up to its
        longest, and a prompt's cold path is its prefill: a longer prompt than any bucket's,
        up to that count, is within the warmed range (the cold-start benchmark's 900-token
        prompts read 0.90-0.95x their steady latency, right after /ready)."""
        rows: dict[int | None, list[tuple[int, int, set[Kind]]]] = {}
        for b in report.buckets:
            done = [*b.rounds, *([b.sweep] if b.sweep else []), *([b.check] if b.check else [])]
            sent = {s.kind for r in done for s in r.samples}
            rows.setdefault(b.rank, []).append((b.prompt_tokens, b.concurrency, sent))
        per_rank = [cls.of(r for r in ranked if r[2]) for ranked in rows.values()]
        warmed = functools.reduce(operator.and_, per_rank) if per_rank else cls.of([])
        if report.prefill is not None and warmed.kinds:
            longest = max(warmed.prompt_tokens, *report.prefill.token_counts)
            warmed = dataclasses.replace(warmed, prompt_tokens=longest)
        return warmed

    @classmethod
    def from_profile(cls, profile: Profile) -> Warmed:
        """What a profile (resolved for its engine) will send."""
        return cls.of(
            (b.prompt_tokens, b.concurrency, corpus.kinds(profile, b)) for b in profile.buckets
        )

    def __or__(self, other: Warmed) -> Warmed:
        """What two warm-ups of one engine warmed together."""
        return Warmed(
            self.kinds | other.kinds,
            max(self.prompt_tokens, other.prompt_tokens),
            max(self.concurrency, other.concurrency),
        )

    def __and__(self, other: Warmed) -> Warmed:
        """What two engines were both warmed at."""
        return Warmed(
            self.kinds & other.kinds,
            min(self.prompt_tokens, other.prompt_tokens),
            min(self.concurrency, other.concurrency),
        )

    def misses(self, shape: Shape) -> list[str]:
        """Why the warm-up did not cover this shape; empty: covered."""
        why = [f"kind {k} not warmed" for k in shape.kind.singles() if k not in self.kinds]
        if shape.prompt_tokens > fromlog.size_class(self.prompt_tokens):
            why.append(f"prompt class {shape.prompt_tokens} above the warmed {self.prompt_tokens}")
        if shape.concurrency > fromlog.size_class(self.concurrency, low=1):
            why.append(f"{shape.concurrency} in flight above the warmed {self.concurrency}")
        return why


def _usage(tail: bytes, which: str) -> int | None:
    found = _USAGE[which].findall(tail)
    return int(found[-1]) if found else None


def classify(
    endpoint: str, data: Any, tail: bytes, in_flight: int, served: frozenset[str]
) -> Shape | None:
    """A served request as a `Shape`: `data` its parsed body (long strings may stand as
    placeholders: `llmwarm.traffic.skeleton`), `tail` the end of its answer (where the usage is).
    None when the body is not a JSON object."""
    if not isinstance(data, dict):
        return None
    seen = fromlog.from_body(data)
    feats = {Feature(name) for name in seen.features}
    model = data.get("model")
    if isinstance(model, str) and model and served and model not in served:
        feats.add(Feature("lora", model))  # a name served besides the base's: an adapter
    prompt = _usage(tail, "prompt") or seen.prompt_tokens or fromlog.DEFAULT_PROMPT_TOKENS
    output = seen.max_tokens if isinstance(seen.max_tokens, int) else _usage(tail, "output")
    spec = endpoints.SPECS[endpoint]
    return Shape(
        kind=Kind(endpoint, bool(seen.stream) and spec.streamable, tuple(feats)),
        prompt_tokens=fromlog.size_class(prompt),
        concurrency=fromlog.size_class(in_flight, low=1),
        max_tokens=fromlog.size_class(output or 16) if spec.generates else 1,
    )


@dataclass
class Miss:
    """One uncovered kind's requests: why, at which shapes, and what its first one cost."""

    why: list[str] = field(default_factory=list)
    shapes: set[Shape] = field(default_factory=set)
    requests: int = 0
    first_s: float | None = None
    later: deque[float] = field(default_factory=lambda: deque(maxlen=LATER_KEPT))

    @property
    def later_median_s(self) -> float | None:
        return statistics.median(self.later) if self.later else None

    @property
    def ratio(self) -> float | None:
        later = self.later_median_s
        if self.first_s is None or not later:
            return None
        return self.first_s / later


@dataclass
class Coverage:
    """Live traffic against what this engine's warm-ups warmed, since this process started.
    Written by the gate (each request) and the lifecycle (each warm-up); read by
    `/warmup/coverage`, `/metrics` and the learn file."""

    served: frozenset[str] = frozenset()  # the base model's names (others are adapters)
    max_running: int | None = None  # the engine's max_num_seqs: more in flight wait in queue
    warmed: Warmed | None = None  # what every finished warm-up warmed; None: none yet
    history: Counter[Shape] = field(default_factory=Counter)  # from the learn files
    own: Counter[Shape] = field(default_factory=Counter)  # from this replica's own file
    served_shapes: Counter[Shape] = field(default_factory=Counter)  # this process's
    covered: int = 0
    uncovered: int = 0
    misses: dict[Kind, Miss] = field(default_factory=dict)  # by the request's kind
    max_model_len: int | None = None  # the engine's: no prompt class is longer
    in_flight: int = 0  # user requests under way (the gate counts them)
    changed: bool = False  # since the learn file was last written
    # requests counted but not kept: their shape past MAX_SHAPES, or a body that could not be
    # read (the gate's)
    untracked: Counter[str] = field(default_factory=Counter)
    other: Miss | None = None  # the uncovered kinds past MAX_MISS_KINDS, together
    _verdicts: dict[Shape, list[str]] = field(default_factory=dict)  # misses(), per warm-up

    def classify(self, endpoint: str, data: Any, tail: bytes, in_flight: int) -> Shape | None:
        """A served request as a `Shape` (`classify`), in flight counted up to what runs, its
        prompt up to what the engine takes."""
        running = min(in_flight, self.max_running) if self.max_running else in_flight
        shape = classify(endpoint, data, tail, running, self.served)
        if shape is not None and self.max_model_len:
            longest = fromlog.size_class(self.max_model_len)
            if shape.prompt_tokens > longest:
                shape = dataclasses.replace(shape, prompt_tokens=longest)
        return shape

    def record(self, shape: Shape, latency_s: float) -> bool:
        """One served request; whether the warm-up covered it."""
        if shape in self.served_shapes or len(self.served_shapes) < MAX_SHAPES:
            self.served_shapes[shape] += 1
            self.changed = True
        else:
            self.untracked["shapes_full"] += 1
        why = self._verdicts.get(shape)
        if why is None:
            why = ["no warm-up yet"] if self.warmed is None else self.warmed.misses(shape)
            if len(self._verdicts) >= MAX_SHAPES:
                self._verdicts.clear()
            self._verdicts[shape] = why
        if not why:
            self.covered += 1
            return True
        self.uncovered += 1
        if shape.kind in self.misses or len(self.misses) < MAX_MISS_KINDS:
            miss = self.misses.setdefault(shape.kind, Miss())
        else:
            miss = self.other = self.other or Miss()
        if miss.first_s is None:
            miss.first_s = latency_s
        else:
            miss.later.append(latency_s)
        miss.why += [w for w in why if w not in miss.why and len(miss.why) < MAX_MISS_SHAPES]
        if len(miss.shapes) < MAX_MISS_SHAPES:
            miss.shapes.add(shape)
        miss.requests += 1
        return False

    def ratios(self) -> list[tuple[str, float]]:
        """Each uncovered kind's cold-miss ratio (the kinds past MAX_MISS_KINDS as `other`)."""
        misses = [*((str(k), m) for k, m in self.misses.items()), (OTHER, self.other)]
        return [(kind, m.ratio) for kind, m in misses if m is not None and m.ratio is not None]

    def warmed_more(self, warmed: Warmed) -> None:
        """A warm-up of this engine finished: what is warm is what every finished one warmed
        (a narrower re-warm takes nothing away), and a kind now covered at every shape seen is
        no longer a miss."""
        warmed = warmed if self.warmed is None else self.warmed | warmed
        self.warmed = warmed
        self._verdicts.clear()
        for kind in [k for k, m in self.misses.items() if not any(map(warmed.misses, m.shapes))]:
            del self.misses[kind]

    def all_shapes(self) -> Counter[Shape]:
        """What traffic looked like: what the learn files held, and what this process served
        (a profile is extended from it)."""
        return self.history + self.served_shapes

    def own_shapes(self) -> Counter[Shape]:
        """This replica's learn file: what it held, and what this process served (only its
        own counts, so a fleet's files add up to what it served)."""
        return self.own + self.served_shapes

    def summary(self) -> dict[str, Any]:
        """`GET /warmup/coverage`: totals, the covered share, and the misses ranked."""
        total = self.covered + self.uncovered
        kinds = [*((str(k), m) for k, m in self.misses.items()), (OTHER, self.other)]
        misses = [
            {
                "kind": kind,
                "why": miss.why,
                "shapes": sorted(s.name.split(" ", 1)[1] for s in miss.shapes),
                "requests": miss.requests,
                "first_s": _round(miss.first_s),
                "later_median_s": _round(miss.later_median_s),
                "cold_miss_ratio": _round(miss.ratio),
            }
            for kind, miss in kinds
            if miss is not None
        ]
        return {
            "requests": total,
            "covered": self.covered,
            "uncovered": self.uncovered,
            "covered_share": round(self.covered / total, 4) if total else None,
            "warmed": None
            if self.warmed is None
            else {
                "kinds": sorted(map(str, self.warmed.kinds)),
                "prompt_tokens": self.warmed.prompt_tokens,
                "concurrency": self.warmed.concurrency,
            },
            "untracked": dict(self.untracked),
            "uncovered_by_requests": sorted(misses, key=lambda m: -m["requests"]),
            "uncovered_by_cold_miss": sorted(
                (m for m in misses if m["cold_miss_ratio"] is not None),
                key=lambda m: -m["cold_miss_ratio"],
            ),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def shapes_from(rows: Iterable[Mapping[str, Any]]) -> Counter[Shape]:
    """Counts from validated learn-file rows."""
    counts: Counter[Shape] = Counter()
    for row in rows:
        kind = Kind(row["endpoint"], row["stream"], tuple(map(Feature.parse, row["features"])))
        counts[Shape(kind, row["prompt_tokens"], row["concurrency"], row["max_tokens"])] += row[
            "requests"
        ]
    return counts
