"""The endpoints llmwarm warms: everything `vllm serve` serves a model on, each described once.

`SPECS` holds, per endpoint, its path, the vLLM capability that registers it, whether it
streams, whether it takes the OpenAI sampling fields that most request features set, how a
request body is built from a prompt, and how its answers show output tokens and usage (in a
unary response and in a stream's events). The corpus builds bodies from it, `measure` reads
answers with it, `profile` validates names against it, and `engine` maps the engine's tasks
onto it. Pure: no vLLM.

    generate   completions, chat, responses (OpenAI Responses), messages (Anthropic Messages)
    pooling    embeddings, pooling, classify, score, rerank  (whichever the model's tasks allow)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Body = dict[str, Any]
Json = Mapping[str, Any]
Usage = tuple[int | None, int | None]  # (prompt tokens, output tokens), None where not told


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def _openai_usage(obj: Json) -> Usage:
    usage = obj.get("usage") or {}
    return _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))


def _io_usage(usage: Any) -> Usage:
    """`input_tokens`/`output_tokens` (the Responses and Messages APIs)."""
    if not isinstance(usage, Mapping):
        return None, None
    return _int(usage.get("input_tokens")), _int(usage.get("output_tokens"))


def _responses_usage(obj: Json) -> Usage:
    if obj.get("type") == "response.completed":  # the stream's last event
        return _io_usage((obj.get("response") or {}).get("usage"))
    return _io_usage(obj.get("usage"))


def _messages_usage(obj: Json) -> Usage:
    if obj.get("type") == "message_start":  # the stream's first event: the input
        return _io_usage((obj.get("message") or {}).get("usage"))
    return _io_usage(obj.get("usage"))  # unary, or the stream's message_delta: the output


def _pooling_usage(obj: Json) -> Usage:
    return _int((obj.get("usage") or {}).get("prompt_tokens")), None


def _choice_text(obj: Json) -> bool:
    for choice in obj.get("choices") or []:
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


def _never(obj: Json) -> bool:
    return False


@dataclass(frozen=True)
class Spec:
    """One endpoint, described once."""

    name: str
    path: str
    task: str  # what the engine must serve: generate, embed, classify, score, pooling
    body: Callable[[str, list[str], int, bool], Body]  # (prompt, documents, max_tokens, stream)
    usage: Callable[[Json], Usage]
    streamable: bool = False
    sampling: bool = False  # takes OpenAI sampling fields (most request features)
    ignore_eos: bool = False  # takes vLLM's ignore_eos (so a warm-up runs its full length)
    messages: bool = False  # the prompt is a list of chat messages (images, tools)
    has_token: Callable[[Json], bool] = _never  # a stream event that carries output text

    @property
    def generates(self) -> bool:
        return self.task == "generate"

    @property
    def templated(self) -> bool:
        """The server wraps the prompt in the model's chat template."""
        return self.messages or self.name == "responses"


def _chat(prompt: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}]


def _openai_stream(stream: bool) -> Body:
    return {"stream": True, "stream_options": {"include_usage": True}} if stream else {}


SPECS: dict[str, Spec] = {
    spec.name: spec
    for spec in (
        Spec(
            "completions", "/v1/completions", "generate",
            body=lambda p, d, n, s: {"prompt": p, "max_tokens": n, **_openai_stream(s)},
            usage=_openai_usage, streamable=True, sampling=True, ignore_eos=True,
            has_token=_choice_text,
        ),
        Spec(
            "chat", "/v1/chat/completions", "generate",
            body=lambda p, d, n, s: {"messages": _chat(p), "max_tokens": n, **_openai_stream(s)},
            usage=_openai_usage, streamable=True, sampling=True, ignore_eos=True, messages=True,
            has_token=_choice_text,
        ),
        Spec(
            "responses", "/v1/responses", "generate",
            # store: false, or vLLM keeps every warm-up response in memory for retrieval
            body=lambda p, d, n, s: {"input": p, "max_output_tokens": n, "store": False,
                                     **({"stream": True} if s else {})},
            usage=_responses_usage, streamable=True, ignore_eos=True,
            has_token=lambda o: o.get("type") == "response.output_text.delta"
            and bool(o.get("delta")),
        ),
        Spec(
            "messages", "/v1/messages", "generate",
            body=lambda p, d, n, s: {"messages": _chat(p), "max_tokens": n,
                                     **({"stream": True} if s else {})},
            usage=_messages_usage, streamable=True, messages=True,
            has_token=lambda o: o.get("type") == "content_block_delta"
            and bool((o.get("delta") or {}).get("text")),
        ),
        Spec(
            "embeddings", "/v1/embeddings", "embed",
            body=lambda p, d, n, s: {"input": p}, usage=_pooling_usage,
        ),
        Spec(
            "pooling", "/pooling", "pooling",
            body=lambda p, d, n, s: {"input": p}, usage=_pooling_usage,
        ),
        Spec(
            "classify", "/classify", "classify",
            body=lambda p, d, n, s: {"input": p}, usage=_pooling_usage,
        ),
        Spec(
            "score", "/score", "score",
            body=lambda p, d, n, s: {"queries": p, "documents": d}, usage=_pooling_usage,
        ),
        Spec(
            "rerank", "/rerank", "score",
            body=lambda p, d, n, s: {"query": p, "documents": d}, usage=_pooling_usage,
        ),
    )
}  # fmt: skip

GENERATE = tuple(name for name, spec in SPECS.items() if spec.generates)
SAMPLING = frozenset(name for name, spec in SPECS.items() if spec.sampling)


def known(name: str) -> str:
    """`name`, if it is an endpoint (a pydantic validator)."""
    if name not in SPECS:
        raise ValueError(f"unknown endpoint {name!r} (known: {', '.join(SPECS)})")
    return name


def failed(event: Json) -> Any:
    """The error a stream event carries, if any (each API has its own form)."""
    if event.get("type") in ("error", "response.failed"):
        return event.get("error") or event.get("response") or event
    return event.get("error")
