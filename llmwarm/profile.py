"""The warm-up profile: which request shapes to make warm, and for how many rounds.

A profile is YAML, validated once here into pydantic models; nothing downstream re-checks it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from llmwarm.convergence import Rule
from llmwarm.errors import ProfileError

Endpoint = Literal["completions", "chat"]


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
    name: str = Field(
        default="",
        description="Stable name used in the report; derived from the sizes when left out.",
    )

    @model_validator(mode="after")
    def _default_name(self) -> Bucket:
        if not self.name:
            self.name = f"p{self.prompt_tokens}-c{self.concurrency}-o{self.max_tokens}"
        return self


class Budget(BaseModel):
    """Limits on the whole warm-up; buckets not yet converged when it runs out are reported."""

    model_config = ConfigDict(extra="forbid")

    max_seconds: float | None = Field(
        default=None,
        gt=0,
        description="Start no new round after this many seconds of warm-up (none: no limit).",
    )


class Profile(BaseModel):
    """A warm-up profile."""

    model_config = ConfigDict(extra="forbid")

    buckets: list[Bucket] = Field(
        min_length=1, description="The request shapes to warm, run in this order."
    )
    endpoints: list[Endpoint] = Field(
        default=["completions", "chat"],
        min_length=1,
        description="OpenAI endpoints each round uses: `completions` and/or `chat`.",
    )
    stream: list[bool] = Field(
        default=[True, False],
        min_length=1,
        description="Streaming modes each round uses; streamed requests give TTFT and TPOT.",
    )
    seed: int = Field(default=0, description="Seed for the synthetic prompts.")
    convergence: Rule = Field(
        default_factory=Rule,
        validate_default=True,  # the default metric needs streaming too
        description="When a bucket is warm: its rounds repeat until this rule holds "
        "(or max_rounds). Round 1 is the cold one.",
    )
    budget: Budget = Field(default_factory=Budget, description="Limits on the whole warm-up.")

    @field_validator("convergence")
    @classmethod
    def _metric_needs_streaming(cls, rule: Rule, info: ValidationInfo) -> Rule:
        # `stream` is declared earlier, so it is validated (if valid) by now.
        stream = info.data.get("stream", [True])
        if rule.metric in ("tpot", "ttft") and True not in stream:
            raise ValueError(
                f"metric {rule.metric!r} is measured on streamed requests, but `stream` has "
                "no `true`; add it or use metric `e2e`"
            )
        return rule

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
    def _no_repeats(cls, values: list[Any]) -> list[Any]:
        if len(set(values)) != len(values):
            raise ValueError(f"a value is listed twice: {values!r}")
        return values


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(profile)"
        message = err["msg"]
        value = err.get("input")
        # Echo the bad value where it is short enough to read; never a whole mapping.
        if err["type"] != "missing" and not isinstance(value, (dict, list)):
            message += f" (got {value!r})"
        problems.append((where, message))
    return problems


def parse_profile(data: Any, *, source: str = "profile") -> Profile:
    """Validate already-loaded YAML data."""
    if not isinstance(data, dict):
        raise ProfileError(
            f"{source}: the top level must be a mapping of fields",
            problems=[(source, f"expected a mapping, got {type(data).__name__}")],
        )
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(f"{source}: invalid profile", problems=_problems(exc)) from None


def load_profile(path: Path) -> Profile:
    """Read and validate a YAML profile file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(
            f"cannot read profile {path}", problems=[(str(path), str(exc))]
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(
            f"profile {path} is not valid YAML", problems=[(str(path), str(exc))]
        ) from None
    return parse_profile(data, source=str(path))
