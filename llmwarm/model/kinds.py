"""A request kind: what a request is besides its size. Its endpoint, whether it streams, and
its features, each with its argument where it takes one (`features.Feature`).

One string form and one parser, used by the corpus, the report, coverage, learn files and
`profile from-log`; no other module takes a kind's string apart:

    chat-stream+logprobs+lora:sql        endpoint[-stream][+feature[:argument]]...
    completions                          no feature: plain (greedy)

A warm-up kind carries one feature (`Kind.of`); a live request may carry several, and is
warm when each of its single-feature kinds is (`Kind.singles`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

from llmwarm.model import endpoints
from llmwarm.model.features import Feature

_STREAM = "-stream"
PLAIN = Feature("greedy")  # a request with no feature


@dataclass(frozen=True, order=True)
class Kind:
    endpoint: str
    stream: bool = False
    features: tuple[Feature, ...] = ()  # sorted, none twice; none at all: a plain request

    def __post_init__(self) -> None:
        endpoints.known(self.endpoint)
        if any(f == PLAIN for f in self.features) or list(self.features) != sorted(
            set(self.features)
        ):
            clean = tuple(sorted({f for f in self.features if f != PLAIN}))
            object.__setattr__(self, "features", clean)

    @classmethod
    def of(cls, endpoint: str, stream: bool, feature: Feature = PLAIN) -> Kind:
        """A warm-up kind: one endpoint, one streaming mode, one feature."""
        return cls(endpoint, stream, (feature,))

    @classmethod
    def parse(cls, text: str) -> Kind:
        """The kind a string names (its one string form); `ValueError` naming what is off."""
        base, *names = text.split("+")
        endpoint = base.removesuffix(_STREAM)
        return cls(endpoint, base != endpoint, tuple(Feature.parse(name) for name in names))

    def __str__(self) -> str:
        base = self.endpoint + (_STREAM if self.stream else "")
        return "+".join([base, *map(str, self.features)])

    @property
    def feature(self) -> Feature:
        """A warm-up kind's one feature (a plain request's: greedy)."""
        return self.features[0] if self.features else PLAIN

    def singles(self) -> list[Kind]:
        """One single-feature kind per feature (a plain request: itself): what the warm-up
        must have sent for this kind to be warm."""
        return [Kind(self.endpoint, self.stream, (f,)) for f in self.features] or [self]

    def general(self) -> Kind:
        """The kind whatever its images' sizes (live traffic does not tell them)."""
        return Kind(self.endpoint, self.stream, tuple(f.general() for f in self.features))


def _kind(value: Any) -> Any:
    return Kind.parse(value) if isinstance(value, str) else value


# A kind in a pydantic model (the report): typed in code, its string form in JSON.
KindField = Annotated[
    Kind,
    BeforeValidator(_kind),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "examples": ["chat-stream+logprobs"]}),
]
