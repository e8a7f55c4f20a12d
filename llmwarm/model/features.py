"""Request features: what users add to a request besides its shape, each of which can send a
cold engine down a path no plain request touched (a logprobs kernel, a grammar compiler, a
sampler with penalties, n > 1 bookkeeping ...).

Each feature is described once, in `SPECS`: the body fields it adds per endpoint, the
endpoints that take it, whether it can be streamed, whether its output is constrained, and
how `profile from-log` recognises it in an OpenAI request body and in vLLM's request log.
Everything else (the profile's list of names, the corpus's kinds, the log reader's order) is
derived from that table: a new feature is one new `Spec`. Pure: no vLLM.

`Features` is the profile section.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from llmwarm.model import endpoints

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}

DEFAULT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "count": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "count"],
    "additionalProperties": False,
}

Body = dict[str, Any]
Encode = Callable[[str], list[int]]  # a tokenizer's text -> token IDs, no special tokens


@dataclass(frozen=True)
class Logged:
    """One request as vLLM's `--enable-log-requests` line shows it: the `SamplingParams(...)`
    text, its `name=value` pairs, and the `lora_request` part."""

    params: str
    values: Mapping[str, str]
    lora: str

    def number(self, key: str) -> float:
        try:
            return float(self.values.get(key, "0"))
        except ValueError:
            return 0.0

    def set(self, key: str) -> bool:
        return self.values.get(key, "None") not in ("None", "[]")

    def structured(self, key: str) -> bool:
        if "structured_outputs=StructuredOutputsParams" not in self.params:
            return False
        inner = self.params.split("structured_outputs=", 1)[1]
        return re.search(rf"\b{key}=(?!None)", inner) is not None


def _never(_: Any) -> bool:
    return False


def _one_text(f: Features) -> int:
    return 1


def _token_ids(body: Mapping[str, Any]) -> bool:
    """A completions prompt given as token IDs (one list, or a list per prompt)."""
    prompt = body.get("prompt")
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], int | list)


def _prompt_batch(body: Mapping[str, Any]) -> bool:
    """Several completions prompts in one request (a list of texts, or of token-ID lists)."""
    prompt = body.get("prompt")
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], str | list)


@dataclass(frozen=True)
class Spec:
    """One request feature, described once."""

    name: str
    help: str
    build: Callable[[Features, str], Body]  # (the profile's settings, endpoint) -> body fields
    in_body: Callable[[Mapping[str, Any]], bool] = _never  # seen in an OpenAI request body
    in_log: Callable[[Logged], bool] = _never  # seen in a vLLM request log line
    endpoints: frozenset[str] | None = endpoints.SAMPLING  # None: every endpoint
    streamable: bool = True  # False: vLLM refuses it with stream=True
    constrained: bool = False  # the output ends when the constraint is met (no ignore_eos)
    # A prompt form: how many texts a request carries, and the completions `prompt` field
    # made of them (None: the one text, as it is)
    texts: Callable[[Features], int] = _one_text
    form: Callable[[list[str], Encode], Any] | None = None

    def takes(self, endpoint: str, stream: bool) -> bool:
        """Whether a request of this endpoint and streaming mode can carry the feature."""
        endpoint_ok = self.endpoints is None or endpoint in self.endpoints
        return endpoint_ok and (self.streamable or not stream)


def _structured(key: str, feature: str) -> Spec:
    """regex / choice / grammar: vLLM's `structured_outputs` field."""
    return Spec(
        feature,
        f"{feature} (structured output)",
        build=lambda f, e: {"structured_outputs": {key: getattr(f, feature)}},
        in_body=lambda b: (
            (b.get("structured_outputs") or {}).get(key) is not None
            or b.get(f"guided_{key}") is not None
        ),
        in_log=lambda log: log.structured(key),
        constrained=True,
    )


def _response_format(kind: str, build: Callable[[Features, str], Body]) -> Spec:
    """json_schema / json_object: the OpenAI `response_format` field."""
    return Spec(
        kind,
        f"{kind} (structured output)",
        build=build,
        in_body=lambda b: (
            (b.get("response_format") or {}).get("type") == kind
            or (
                kind == "json_schema"
                and (b.get("structured_outputs") or {}).get("json") is not None
            )
        ),
        in_log=lambda log: kind == "json_schema" and log.structured("json"),
        constrained=True,
    )


SPECS: dict[str, Spec] = {
    spec.name: spec
    for spec in (
        Spec("greedy", "greedy (temperature 0)", build=lambda f, e: {}, endpoints=None),
        Spec(
            "sampling",
            "sampling (temperature/top_p/top_k/min_p/seed)",
            build=lambda f, e: {
                "temperature": 0.8,
                "top_p": 0.95,
                "top_k": 50,
                "min_p": 0.05,
                "seed": 1234,
            },  # fmt: skip
            in_body=lambda b: (
                (b.get("temperature") or 0) > 0 or any(k in b for k in ("top_p", "top_k", "min_p"))
            ),
            in_log=lambda log: log.number("temperature") > 0,
        ),
        Spec(
            "penalties",
            "penalties (presence/frequency/repetition)",
            build=lambda f, e: {
                "presence_penalty": 0.5,
                "frequency_penalty": 0.5,
                "repetition_penalty": 1.1,
            },  # fmt: skip
            in_body=lambda b: any(
                b.get(k) for k in ("presence_penalty", "frequency_penalty", "repetition_penalty")
            ),
            in_log=lambda log: (
                bool(log.number("presence_penalty"))
                or bool(log.number("frequency_penalty"))
                or log.number("repetition_penalty") not in (0.0, 1.0)
            ),
        ),
        Spec(
            "logprobs",
            "logprobs",
            build=lambda f, e: (
                {"logprobs": True, "top_logprobs": f.logprobs}
                if e == "chat"
                else {"logprobs": f.logprobs}
            ),
            in_body=lambda b: bool(b.get("logprobs") or b.get("top_logprobs")),
            in_log=lambda log: log.set("logprobs"),
        ),
        Spec(
            "prompt_logprobs",
            "prompt_logprobs",
            build=lambda f, e: {"prompt_logprobs": f.prompt_logprobs},
            in_body=lambda b: bool(b.get("prompt_logprobs")),
            in_log=lambda log: log.set("prompt_logprobs"),
            streamable=False,
        ),
        Spec(
            "n",
            "n (several choices)",
            build=lambda f, e: {"n": f.n, "temperature": 0.8, "seed": 1234},
            in_body=lambda b: (b.get("n") or 1) > 1,
            in_log=lambda log: log.number("n") > 1,
        ),
        Spec(
            "stop",
            "stop (stop strings)",
            build=lambda f, e: {"stop": f.stop},
            in_body=lambda b: bool(b.get("stop")),
            in_log=lambda log: log.set("stop"),
        ),
        _response_format(
            "json_schema",
            lambda f, e: {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "llmwarm", "schema": f.json_schema},
                }
            },
        ),
        _response_format("json_object", lambda f, e: {"response_format": {"type": "json_object"}}),
        _structured("regex", "regex"),
        _structured("choice", "choice"),
        _structured("grammar", "grammar"),
        Spec(
            "tools",
            "tools (a named tool call, chat only; the chat template must take tools)",
            # A named tool choice: vLLM constrains the arguments to the tool's schema, with
            # no tool-call parser needed.
            build=lambda f, e: {
                "tools": [TOOL],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            },
            in_body=lambda b: bool(b.get("tools")),
            endpoints=frozenset({"chat"}),
            constrained=True,
        ),
        Spec(
            "image",
            "image (chat with one image of each size in `images`, as a data URL; the model "
            "must take images)",
            build=lambda f, e: {},  # per size: `image:WxH`, see `apply()`
            in_body=lambda b: any(
                isinstance(part, Mapping) and part.get("type") in ("image_url", "image")
                for m in b.get("messages") or []
                if isinstance(m, Mapping) and isinstance(m.get("content"), list)
                for part in m["content"]
            ),
            endpoints=frozenset({"chat"}),
        ),
        Spec(
            "token_ids",
            "token_ids (the prompt as token IDs; completions only)",
            build=lambda f, e: {},
            in_body=_token_ids,
            endpoints=frozenset({"completions"}),
            form=lambda texts, encode: encode(texts[0]),
        ),
        Spec(
            "prompt_batch",
            "prompt_batch (`prompt_batch` prompts in one request; completions only)",
            build=lambda f, e: {},
            in_body=_prompt_batch,
            endpoints=frozenset({"completions"}),
            texts=lambda f: f.prompt_batch,
            form=lambda texts, encode: list(texts),
        ),
        Spec(
            "lora",
            "lora (each adapter in `lora`)",
            build=lambda f, e: {},  # per adapter: `lora:NAME`, see `apply()`
            in_log=lambda log: log.lora.strip() != "None",
            endpoints=None,
        ),
    )
}


# Features that take an argument: the adapter's name, the image's size (`image` alone, in
# live traffic: an image of any size).
_ARGUMENT = {"lora": "an adapter name", "image": "WIDTHxHEIGHT"}


@functools.total_ordering
@dataclass(frozen=True)
class Feature:
    """One feature as a request kind carries it: its name, and its argument where it takes
    one. One string form (`logprobs`, `lora:sql`, `image:224x224`) and one parser."""

    name: str
    arg: str | None = None

    def __lt__(self, other: Feature) -> bool:
        return (self.name, self.arg or "") < (other.name, other.arg or "")

    def __post_init__(self) -> None:
        if self.name not in SPECS:
            raise ValueError(f"unknown feature {self.name!r} (known: {', '.join(SPECS)})")
        if self.arg is not None and (self.name not in _ARGUMENT or not self.arg):
            raise ValueError(f"feature {self.name!r} takes no argument (got {self.arg!r})")
        if self.name == "lora" and self.arg is None:
            raise ValueError("feature 'lora' needs an adapter name: lora:NAME")

    def __str__(self) -> str:
        return self.name if self.arg is None else f"{self.name}:{self.arg}"

    @classmethod
    def parse(cls, text: str) -> Feature:
        name, colon, arg = text.partition(":")
        return cls(name, arg if colon else None)

    @property
    def spec(self) -> Spec:
        return SPECS[self.name]

    def general(self) -> Feature:
        """The feature whatever its image's size (live traffic does not tell it)."""
        return Feature("image") if self.name == "image" else self


def _known(name: str) -> str:
    if name not in SPECS:
        raise ValueError(f"unknown feature {name!r} (known: {', '.join(SPECS)})")
    return name


FeatureName = Annotated[str, AfterValidator(_known), Field(json_schema_extra={"enum": list(SPECS)})]


class Features(BaseModel):
    """Request features to warm, crossed with some buckets."""

    model_config = ConfigDict(extra="forbid")

    use: list[FeatureName] = Field(
        default=["greedy"],
        min_length=1,
        description="Features to send, each as its own request kind: "
        + ", ".join(s.help for s in SPECS.values())
        + ".",
    )
    buckets: list[str] | None = Field(
        default=None,
        description="Names of the buckets every feature is crossed with; the others send "
        "greedy requests only. Default: the first bucket.",
    )
    logprobs: int = Field(default=5, ge=1, le=20, description="Top log-probabilities asked.")
    prompt_logprobs: int = Field(
        default=1, ge=0, le=20, description="Prompt log-probabilities asked."
    )
    n: int = Field(default=2, ge=2, le=16, description="Choices per request for `n`.")
    prompt_batch: int = Field(
        default=4, ge=2, le=64, description="Prompts per request for `prompt_batch`."
    )
    stop: list[str] = Field(
        default=["\n\n", "."], min_length=1, max_length=4, description="Stop strings for `stop`."
    )
    json_schema: dict[str, Any] = Field(
        default=DEFAULT_SCHEMA, description="The JSON Schema `json_schema` requests follow."
    )
    regex: str = Field(
        default=r"[a-z]{2,8}( [a-z]{2,8}){0,4}", description="The pattern `regex` follows."
    )
    choice: list[str] = Field(
        default=["yes", "no", "maybe"], min_length=2, description="The options of `choice`."
    )
    grammar: str = Field(
        default='root ::= "the " noun " is " ("warm" | "cold")\nnoun ::= "model" | "cache"',
        min_length=1,
        description="The EBNF grammar `grammar` follows (vLLM's structured-output syntax).",
    )
    lora: list[str] = Field(
        default=[],
        description="LoRA adapter names (as given to --lora-modules) for the `lora` feature.",
    )
    images: list[str] = Field(
        default=["64x64", "224x224", "640x480"],
        min_length=1,
        description="Image sizes (`WIDTHxHEIGHT`) for the `image` feature, each its own kind: "
        "a model's image processor resizes, tiles or patches them differently by size.",
    )

    auto_image: bool = Field(
        default=True,
        description="When the model takes images and `image` is not in `use`, send the "
        "`image` kinds too (on the chat endpoint), so a vision model's image path is warm "
        "with any profile. `image` listed in `use` on a text-only model is an error.",
    )

    @field_validator("images")
    @classmethod
    def _sizes(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            width, _, height = size.partition("x")
            if not (width.isdigit() and height.isdigit() and 0 < int(width) <= 8192
                    and 0 < int(height) <= 8192):  # fmt: skip
                raise ValueError(f"{size!r} is not WIDTHxHEIGHT (1 to 8192 pixels each)")
        return sizes

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        import jsonschema

        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
        return schema

    @field_validator("regex")
    @classmethod
    def _valid_regex(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return pattern

    def features(self) -> list[Feature]:
        """The features to send, each its own request kind, in order: `lora` one per adapter
        (`lora:NAME`), `image` one per size (`image:WxH`)."""
        out: list[Feature] = []
        for name in self.use:
            if name == "lora":
                out += [Feature("lora", adapter) for adapter in self.lora]
            elif name == "image":
                out += [Feature("image", size) for size in self.images]
            else:
                out.append(Feature(name))
        return out


def apply(feature: Feature, endpoint: str, features: Features, request: Body) -> Body:
    """A request body with one feature applied (`features`: the profile's settings)."""
    if feature.name == "image":
        assert feature.arg is not None  # the warm-up sends a size
        return {**request, "messages": with_image(request["messages"], feature.arg)}
    if feature.name == "lora":
        return {**request, "model": feature.arg}
    return {**request, **feature.spec.build(features, endpoint)}


def with_image(messages: list[dict[str, Any]], size: str) -> list[dict[str, Any]]:
    """The chat messages with an image of `size` (WIDTHxHEIGHT) after the last one's text."""
    *before, last = messages
    parts = [
        {"type": "text", "text": last["content"]},
        {"type": "image_url", "image_url": {"url": image_data_url(size)}},
    ]
    return [*before, {**last, "content": parts}]


@functools.lru_cache(maxsize=16)
def image_data_url(size: str) -> str:
    """A deterministic PNG of `size` (a gradient with a grid, so it compresses but is not
    blank), as a data URL. Made in-process: no file, no network."""
    import base64
    import io

    from PIL import Image

    width, height = (int(v) for v in size.split("x"))
    image = Image.new("RGB", (width, height))
    image.putdata(
        [((x * 255) // width, (y * 255) // height, 255 if (x // 16 + y // 16) % 2 else 64)
         for y in range(height) for x in range(width)]
    )  # fmt: skip
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def in_body(body: Mapping[str, Any]) -> set[str]:
    """The features an OpenAI request body uses."""
    return {name for name, s in SPECS.items() if s.in_body(body)}


def in_log(logged: Logged) -> set[str]:
    """The features a vLLM request log line shows."""
    return {name for name, s in SPECS.items() if s.in_log(logged)}


# The most `top_logprobs` warmed when vLLM sets no limit (--max-logprobs -1): OpenAI's own.
UNLIMITED_LOGPROBS = 20


def logprob_classes(max_logprobs: int) -> list[int]:
    """One log-probability count per kernel vLLM's GPU sampler compiles for it: the v2 model
    runner's top-k log-softmax kernel takes the next power of two of 1 + the step's largest
    count as a compile-time width (`vllm/v1/worker/gpu/sample/logprob.py`,
    `compute_token_logprobs`), so counts 0, 1, 2-3, 4-7, 8-15, 16-31, ... each compile on first
    use, and vLLM's own warm-up reaches one of them. The largest count of each class up to
    `max_logprobs` (-1: `UNLIMITED_LOGPROBS`)."""
    limit = max_logprobs if max_logprobs >= 0 else UNLIMITED_LOGPROBS
    counts, width = [], 1
    while width // 2 <= limit:  # the class of `width`: counts from width // 2 to width - 1
        counts.append(min(width - 1, limit))
        width *= 2
    return counts
