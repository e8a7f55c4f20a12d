"""Request features: what users add to a request besides its shape, each of which can send a
cold engine down a path no plain request touched (a logprobs kernel, a grammar compiler, a
sampler with penalties, n > 1 bookkeeping ...).

`Features` is the profile section; `body(...)` turns one feature into request-body fields for
one endpoint. Pure: no vLLM.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FeatureName = Literal[
    "greedy",
    "sampling",
    "penalties",
    "logprobs",
    "prompt_logprobs",
    "json_schema",
    "json_object",
    "regex",
    "choice",
    "grammar",
    "n",
    "stop",
    "tools",
    "lora",
]

# Features whose output is constrained: the request ends when the constraint is met, so
# `ignore_eos` must not force it on.
STRUCTURED = {"json_schema", "json_object", "regex", "choice", "grammar", "tools"}

# Features only the chat endpoint has.
CHAT_ONLY = {"tools"}

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

# vLLM refuses these with stream=True.
NOT_STREAMED = {"prompt_logprobs"}

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


class Features(BaseModel):
    """Request features to warm, crossed with some buckets."""

    model_config = ConfigDict(extra="forbid")

    use: list[FeatureName] = Field(
        default=["greedy"],
        min_length=1,
        description="Features to send, each as its own request kind: greedy (temperature 0), "
        "sampling (temperature/top_p/top_k/min_p/seed), penalties (presence/frequency/"
        "repetition), logprobs, prompt_logprobs, json_schema, json_object, regex, choice, "
        "grammar (structured output), n (several choices), stop (stop strings), tools (a "
        "named tool call, chat only; the chat template must take tools), lora (each adapter "
        "in `lora`).",
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

    def kinds(self) -> list[str]:
        """Feature kinds in order; `lora` becomes one kind per adapter (`lora:NAME`)."""
        names: list[str] = []
        for feature in self.use:
            if feature == "lora":
                names += [f"lora:{adapter}" for adapter in self.lora]
            else:
                names.append(feature)
        return names


def body(feature: str, endpoint: str, features: Features) -> dict[str, Any]:
    """Request-body fields for one feature kind on one endpoint."""
    if feature.startswith("lora:"):
        return {"model": feature.removeprefix("lora:")}
    chat = endpoint == "chat"
    structured: dict[str, Any]
    match feature:
        case "greedy":
            return {}
        case "sampling":
            return {"temperature": 0.8, "top_p": 0.95, "top_k": 50, "min_p": 0.05, "seed": 1234}
        case "penalties":
            return {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1}
        case "logprobs":
            if chat:
                return {"logprobs": True, "top_logprobs": features.logprobs}
            return {"logprobs": features.logprobs}
        case "prompt_logprobs":
            return {"prompt_logprobs": features.prompt_logprobs}
        case "n":
            return {"n": features.n, "temperature": 0.8, "seed": 1234}
        case "stop":
            return {"stop": features.stop}
        case "json_schema":
            return {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "llmwarm", "schema": features.json_schema},
                }
            }
        case "json_object":
            return {"response_format": {"type": "json_object"}}
        case "tools":
            # A named tool choice: vLLM constrains the arguments to the tool's schema, with
            # no tool-call parser needed.
            return {
                "tools": [TOOL],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            }
        case "regex":
            structured = {"regex": features.regex}
        case "choice":
            structured = {"choice": features.choice}
        case "grammar":
            structured = {"grammar": features.grammar}
        case _:
            raise ValueError(f"unknown feature {feature!r}")
    return {"structured_outputs": structured}
