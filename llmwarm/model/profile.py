"""The warm-up profile: which request shapes and features to make warm, and when it is warm.

A profile is YAML, validated once here into pydantic models; nothing downstream re-checks it.
What only the started engine knows (`auto` buckets, its context length, its LoRA adapters) is
applied by `llmwarm.model.fit.for_engine`, which raises the same errors, naming the same fields.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from llmwarm.errors import ProfileError, dotted, from_validation
from llmwarm.model import endpoints
from llmwarm.model.convergence import Rule
from llmwarm.model.features import Features

EndpointName = Annotated[
    str, AfterValidator(endpoints.known), Field(json_schema_extra={"enum": list(endpoints.SPECS)})
]


class Bucket(BaseModel):
    """One request shape: prompt length x concurrency x output length."""

    model_config = ConfigDict(extra="forbid")

    prompt_tokens: int = Field(
        gt=0, le=1_000_000, description="Prompt length in tokens of the model's own tokenizer."
    )
    concurrency: int = Field(
        gt=0, le=4096, description="How many requests of this shape are in flight at once."
    )
    max_tokens: int = Field(
        gt=0, le=1_000_000, description="Output length in tokens (EOS is ignored, so exact)."
    )
    documents: int = Field(
        default=4,
        gt=0,
        le=1024,
        description="Documents per request on `score` and `rerank` (each of prompt_tokens).",
    )
    priority: int = Field(
        default=0,
        description="Higher runs earlier, so it is warm first when the budget is tight.",
    )
    optional: bool = Field(
        default=False,
        description="Extra coverage: warmed only as `budget.optional_share` allows; one that time "
        "does not reach is `skipped` (or cut: `budget`), and neither makes the warm-up "
        "unconverged. `auto` buckets are optional.",
    )
    name: str = Field(
        default="",
        description="Stable name used in the report; derived from the sizes when left out.",
    )

    # Where the user wrote it (`buckets.N` or `grid`), for errors found against an engine.
    _row: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _default_name(self) -> Bucket:
        if not self.name:
            self.name = f"p{self.prompt_tokens}-c{self.concurrency}-o{self.max_tokens}"
        return self

    @property
    def row(self) -> str:
        """Where the user wrote the bucket; empty for one made from `auto`."""
        return self._row


class Grid(BaseModel):
    """Buckets as the cartesian product of three lists."""

    model_config = ConfigDict(extra="forbid")

    prompt_tokens: list[int] = Field(min_length=1, description="Prompt lengths (tokens).")
    concurrency: list[int] = Field(min_length=1, description="Requests in flight.")
    max_tokens: list[int] = Field(min_length=1, description="Output lengths (tokens).")

    def buckets(self) -> list[dict[str, int]]:
        return [
            {"prompt_tokens": p, "concurrency": c, "max_tokens": o}
            for p, c, o in itertools.product(self.prompt_tokens, self.concurrency, self.max_tokens)
        ]


class Auto(BaseModel):
    """Buckets derived from the started engine's own limits."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(default=32, gt=0, description="Output length of auto buckets.")
    min_prompt_tokens: int = Field(default=16, gt=0, description="Shortest auto prompt.")
    max_prompt_tokens: int = Field(
        default=8192, gt=0, description="Longest auto prompt (besides the chunked-prefill one)."
    )
    max_concurrency: int | None = Field(
        default=None, gt=0, description="Highest concurrency class (default: max_num_seqs)."
    )
    chunked_prefill: bool = Field(
        default=True,
        description="Add a prompt longer than max_num_batched_tokens, so chunked prefill runs.",
    )


class Budget(BaseModel):
    """Limits on the whole warm-up; buckets not yet converged when it runs out are reported."""

    model_config = ConfigDict(extra="forbid")

    max_seconds: float | None = Field(
        default=None,
        gt=0,
        description="Start no new round after this many seconds of warm-up (none: no limit).",
    )
    max_requests: int | None = Field(
        default=None,
        gt=0,
        description="Start no new round after this many warm-up requests (none: no limit).",
    )
    optional_share: float | None = Field(
        default=None,
        gt=0,
        le=10,
        description="Optional buckets (`auto` ones, those marked `optional`) run, after the "
        "others, while the warm-up as a whole (the required buckets, which always run, and the "
        "KV-cache fill included) is within this share of the engine's start time (none: only "
        "the limits above): a slow start (a big model, a GPU server) buys more coverage, a fast "
        "one stays fast, and a warm-up whose required buckets took that long already adds none.",
    )


class KvFill(BaseModel):
    """Drive a share of the engine's KV-cache blocks through prefill once, before the buckets,
    so no block is touched for the first time by a user (page faults on CPU; allocator and
    eviction paths everywhere)."""

    model_config = ConfigDict(extra="forbid")

    share: float = Field(
        gt=0, le=1, description="Share of the engine's KV-cache blocks to prefill once."
    )
    prompt_tokens: int | None = Field(
        default=None,
        gt=0,
        description="Prompt length of the fill requests (default: max_model_len - 8, at most "
        "4096).",
    )
    concurrency: int = Field(default=8, gt=0, le=1024, description="Fill requests at once.")


class Prefill(BaseModel):
    """One-output-token requests whose prompts step through the prefill token counts the
    engine schedules, once, before the buckets (`llmwarm.warmup.prefill`): each count's one-time
    cost (on CPU a oneDNN primitive per matmul shape; on GPU an eager step past the captured sizes,
    an autotune per shape) is paid at a fraction of a decode round's."""

    model_config = ConfigDict(extra="forbid")

    min_tokens: int = Field(default=16, gt=0, description="The shortest prompt of the sweep.")
    max_tokens: int | None = Field(
        default=None,
        gt=0,
        description="The longest (default: --max-num-batched-tokens, and then the longest "
        "prompt --max-model-len takes, prefilled in chunks).",
    )
    batched: int = Field(
        default=4,
        ge=1,
        le=256,
        description="Each count alone, then again as this many requests at once (a step of "
        "several prompts); 1: alone only.",
    )
    max_share: float | None = Field(
        default=0.05,
        gt=0,
        le=10,
        description="The sweep climbs from the shortest count, and sends a count only if, "
        "at the last count's time a token, it would end within this share of the engine's "
        "start time; the longer counts are cut (the report lists them). A count's one-time "
        "cost is milliseconds: on a GPU every count's prefill takes about that and all run; "
        "on a CPU a long prompt's prefill takes seconds, and the cost is lost in it. null: "
        "every count.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> Prefill:
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) is below min_tokens ({self.min_tokens})"
            )
        return self


class Prompts(BaseModel):
    """Where prompt text comes from; lengths always follow the buckets."""

    model_config = ConfigDict(extra="forbid")

    file: Path | None = Field(
        default=None,
        description='Text file (one prompt a line) or JSONL (`{"prompt": ...}` or '
        '`{"messages": [...]}` a line), relative to the profile. Prompts are cut or '
        "joined to each bucket's length. Default: synthetic pseudo-words.",
    )
    _texts: list[str] = PrivateAttr(default_factory=list)

    @property
    def texts(self) -> list[str]:
        return self._texts


class Profile(BaseModel):
    """A warm-up profile."""

    model_config = ConfigDict(extra="forbid")

    grid: Grid | None = Field(default=None, description="Buckets as a cartesian grid.")
    buckets: list[Bucket] = Field(
        default=[], description="Buckets as explicit rows (after the grid's)."
    )
    auto: Auto | None = Field(
        default=None, description="Buckets derived from the engine's limits at start."
    )
    endpoints: list[EndpointName] | None = Field(
        default=None,
        min_length=1,
        description="Endpoints each round uses: "
        + ", ".join(endpoints.SPECS)
        + ". Default: every one the engine serves for this model (its tasks decide: "
        "completions, chat, responses, messages for a generate model; embeddings, pooling, "
        "classify, score, rerank as a pooling model's tasks allow).",
    )
    stream: list[bool] = Field(
        default=[True, False],
        min_length=1,
        description="Streaming modes each round uses; streamed requests give TTFT and TPOT.",
    )
    features: Features = Field(
        default_factory=Features, description="Request features, crossed with some buckets."
    )
    prompts: Prompts = Field(default_factory=Prompts, description="Where prompt text comes from.")
    seed: int = Field(default=0, description="Seed for the prompts.")
    convergence: Rule = Field(
        default_factory=Rule,
        validate_default=True,  # the default metric needs streaming too
        description="When a bucket is warm: its rounds repeat until this rule holds "
        "(or max_rounds). Round 1 is the cold one.",
    )
    check: bool = Field(
        default=False,
        description="After a bucket's last round, send its sweep again (the check), so the "
        "report's per-kind table compares each swept kind's first requests with warm ones. It "
        "warms nothing the sweep did not, and costs a second sweep: on a CPU, where every "
        "token of a wide sweep is real prefill, seconds (default: off; minimal.yaml, the CI "
        "profile, turns it on).",
    )
    budget: Budget = Field(default_factory=Budget, description="Limits on the whole warm-up.")
    kv_fill: KvFill | None = Field(
        default=None, description="Prefill a share of the KV cache once (default: off)."
    )
    prefill: Prefill | None = Field(
        default=None,
        description="Step through the engine's prefill token counts once, each prompt's prefill "
        "and one decode step over it, before the buckets (default: off; the shipped profiles "
        "turn it on).",
    )

    @model_validator(mode="before")
    @classmethod
    def _expand_grid(cls, data: Any) -> Any:
        # The grid becomes ordinary bucket rows, ahead of the explicit ones.
        if isinstance(data, dict) and isinstance(data.get("grid"), dict):
            try:
                grid = Grid.model_validate(data["grid"])
            except ValidationError:
                return data  # reported under `grid` by the field's own validation
            rows = data.get("buckets", [])
            if isinstance(rows, list):
                data = {**data, "buckets": grid.buckets() + rows}
        return data

    @field_validator("buckets")
    @classmethod
    def _unique_names(cls, buckets: list[Bucket]) -> list[Bucket]:
        names = [b.name for b in buckets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"bucket names must be unique; repeated: {', '.join(dupes)}")
        return buckets

    @field_validator("endpoints", "stream")
    @classmethod
    def _no_repeats(cls, values: list[Any] | None) -> list[Any] | None:
        if values is not None and len(set(values)) != len(values):
            raise ValueError(f"a value is listed twice: {values!r}")
        return values

    @field_validator("features")
    @classmethod
    def _feature_buckets_exist(cls, features: Features, info: ValidationInfo) -> Features:
        known = {b.name for b in info.data.get("buckets", [])}
        unknown = [name for name in features.buckets or [] if name not in known]
        if unknown and "buckets" in info.data:
            raise ValueError(f"features.buckets names no such bucket: {', '.join(unknown)}")
        if "lora" in features.use and not features.lora:
            raise ValueError("`lora` is used but features.lora names no adapter")
        return features

    @field_validator("convergence")
    @classmethod
    def _metric_needs_streaming(cls, rule: Rule, info: ValidationInfo) -> Rule:
        stream = info.data.get("stream", [True])
        if rule.metric in ("tpot", "ttft") and True not in stream:
            raise ValueError(
                f"metric {rule.metric!r} is measured on streamed requests, but `stream` has "
                "no `true`; add it or use metric `e2e`"
            )
        return rule

    @model_validator(mode="after")
    def _has_buckets(self) -> Profile:
        if not self.buckets and self.auto is None:
            raise ValueError("no buckets: give `buckets`, a `grid`, or `auto`")
        made = len(self.grid.buckets()) if self.grid is not None else 0
        for i, bucket in enumerate(self.buckets):
            bucket._row = "grid" if i < made else f"buckets.{i - made}"
        # Highest priority first; rows of equal priority keep their order.
        self.buckets.sort(key=lambda b: -b.priority)
        return self

    def endpoint_names(self) -> list[str]:
        """The endpoints to warm; before `for_engine` resolves the default, the generate
        ones."""
        return list(self.endpoints or endpoints.GENERATE)

    def feature_buckets(self) -> set[str]:
        """Names of the buckets that every feature is crossed with."""
        if self.features.buckets is not None:
            return set(self.features.buckets)
        return {self.buckets[0].name} if self.buckets else set()


# --- loading --------------------------------------------------------------------------------


def _user_rows(data: dict[str, Any]) -> Callable[[tuple[int | str, ...]], str]:
    """Error paths in the user's own rows: the grid's buckets stand ahead of the explicit
    ones in `buckets`, so `buckets.N` is shifted back (or named `grid`)."""
    grid = data.get("grid")
    try:
        made = len(Grid.model_validate(grid).buckets()) if isinstance(grid, dict) else 0
    except ValidationError:
        made = 0

    def where(loc: tuple[int | str, ...]) -> str:
        if made and len(loc) >= 2 and loc[0] == "buckets" and isinstance(loc[1], int):
            if loc[1] < made:
                return dotted(("grid", *loc[2:]))
            loc = ("buckets", loc[1] - made, *loc[2:])
        return dotted(loc)

    return where


def parse_profile(data: Any, *, source: str = "profile") -> Profile:
    """Validate already-loaded YAML data (with `extends` already merged)."""
    if not isinstance(data, dict):
        raise ProfileError(
            f"{source}: the top level must be a mapping of fields",
            problems=[(source, f"expected a mapping, got {type(data).__name__}")],
        )
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        problems = from_validation(exc, root="profile", echo=True, where=_user_rows(data))
        raise ProfileError(f"{source}: invalid profile", problems=problems) from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """The file's mapping with its `extends` chain merged underneath it."""
    real = path.resolve()
    if real in chain:
        cycle = " -> ".join(str(p) for p in (*chain, real))
        raise ProfileError("cyclic extends", problems=[("extends", cycle)])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        where = f"{chain[-1]}: extends" if chain else str(path)
        raise ProfileError(f"cannot read profile {path}", problems=[(where, str(exc))]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(
            f"profile {path} is not valid YAML", problems=[(str(path), str(exc))]
        ) from None
    if not isinstance(data, dict):
        raise ProfileError(
            f"{path}: the top level must be a mapping of fields",
            problems=[(str(path), f"expected a mapping, got {type(data).__name__}")],
        )
    # Relative paths inside a profile are relative to its own file.
    prompts = data.get("prompts")
    if isinstance(prompts, dict) and isinstance(prompts.get("file"), str):
        data["prompts"] = {**prompts, "file": str(path.parent / prompts["file"])}
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ProfileError(
            f"{path}: bad extends", problems=[("extends", f"expected a path, got {parent!r}")]
        )
    base = path.parent / parent
    if not base.exists() and parent in shipped_names():
        base = shipped(parent)  # `extends: chat`: a shipped profile
    return _merge(_read(base, (*chain, real)), data)


def _load_texts(file: Path) -> list[str]:
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(
            "cannot read the prompts file", problems=[("prompts.file", str(exc))]
        ) from None
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if file.suffix != ".jsonl":
            texts.append(line)
            continue
        try:
            row = json.loads(line)
            if "prompt" in row:
                texts.append(str(row["prompt"]))
            else:
                texts.append(" ".join(str(m["content"]) for m in row["messages"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ProfileError(
                "bad prompts file",
                problems=[(f"prompts.file line {n}", f"expected {{prompt}} or {{messages}}: "
                           f"{type(exc).__name__}: {exc}")],
            ) from None  # fmt: skip
    if not texts:
        raise ProfileError("empty prompts file", problems=[("prompts.file", f"{file}: no text")])
    return texts


def shipped_names() -> list[str]:
    """The profiles shipped with llmwarm, by name (`default`, `long-context`, ...)."""
    folder = resources.files("llmwarm") / "configs"
    return sorted(f.name[: -len(".yaml")] for f in folder.iterdir() if f.name.endswith(".yaml"))


def shipped(name: str) -> Path:
    """A profile shipped with llmwarm, e.g. `default` for `configs/default.yaml`."""
    return Path(str(resources.files("llmwarm") / "configs" / f"{name}.yaml"))


def load_profile(path: Path) -> Profile:
    """Read, merge (`extends`) and validate a YAML profile file."""
    profile = parse_profile(_read(path, ()), source=str(path))
    if profile.prompts.file is not None:
        profile.prompts._texts = _load_texts(profile.prompts.file)
    return profile
