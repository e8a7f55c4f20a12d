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

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

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


def _choices(obj: Json) -> bool:
    return bool(obj.get("choices"))


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
    # A stream event that shows the first token came, even one with no text (a special token,
    # an end of sequence at once): where TTFT stops. As `vllm bench serve` times it: completions
    # and chat, the first chunk with choices (vLLM sends chat's role chunk with the first token).
    first_token: Callable[[Json], bool] | None = None  # None: the first `has_token` event
    in_body: Callable[[Json], bool] = _never  # a request body of this API (no path at hand)
    log_id: str | None = None  # how vLLM's request log names its requests: `cmpl-...`

    @property
    def generates(self) -> bool:
        return self.task == "generate"

    def starts(self, event: Json) -> bool:
        """Whether a stream event shows the first token came: where TTFT stops."""
        return (self.first_token or self.has_token)(event)

    @property
    def templated(self) -> bool:
        """The server wraps the prompt in the model's chat template."""
        return self.messages or self.name == "responses"


# Fields only a Responses API body has (its `input` alone would read as an embeddings body).
_RESPONSES_ONLY = ("max_output_tokens", "instructions", "store", "previous_response_id",
                   "reasoning", "text", "tools", "background")  # fmt: skip


def _anthropic(body: Json) -> bool:
    """Fields only an Anthropic Messages body has (its `messages` read like chat's)."""
    if any(k in body for k in ("system", "stop_sequences", "thinking")):
        return True
    return any(
        isinstance(part, Mapping) and part.get("type") == "image" and "source" in part
        for m in body.get("messages") or []
        if isinstance(m, Mapping) and isinstance(m.get("content"), list)
        for part in m["content"]
    )


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
            has_token=_choice_text, first_token=_choices, in_body=lambda b: "prompt" in b,
            log_id="cmpl-",
        ),
        Spec(
            "chat", "/v1/chat/completions", "generate",
            body=lambda p, d, n, s: {"messages": _chat(p), "max_tokens": n, **_openai_stream(s)},
            usage=_openai_usage, streamable=True, sampling=True, ignore_eos=True, messages=True,
            has_token=_choice_text, first_token=_choices,
            in_body=lambda b: "messages" in b and not _anthropic(b),
            log_id="chatcmpl-",  # the Messages API runs through chat: its requests too
        ),
        Spec(
            "responses", "/v1/responses", "generate",
            # store: false, or vLLM keeps every warm-up response in memory for retrieval
            body=lambda p, d, n, s: {"input": p, "max_output_tokens": n, "store": False,
                                     **({"stream": True} if s else {})},
            usage=_responses_usage, streamable=True, ignore_eos=True,
            has_token=lambda o: o.get("type") == "response.output_text.delta"
            and bool(o.get("delta")),
            in_body=lambda b: "input" in b and any(k in b for k in _RESPONSES_ONLY),
            log_id="resp_",
        ),
        Spec(
            "messages", "/v1/messages", "generate",
            body=lambda p, d, n, s: {"messages": _chat(p), "max_tokens": n,
                                     **({"stream": True} if s else {})},
            usage=_messages_usage, streamable=True, messages=True,
            has_token=lambda o: o.get("type") == "content_block_delta"
            and bool((o.get("delta") or {}).get("text")),
            # vLLM sends message_start with chat's first chunk, so with the first token
            first_token=lambda o: o.get("type") == "message_start",
            in_body=lambda b: "messages" in b and _anthropic(b),
        ),
        Spec(
            "embeddings", "/v1/embeddings", "embed",
            body=lambda p, d, n, s: {"input": p}, usage=_pooling_usage,
            # (pooling and classify bodies look alike: only a path or a log id tells them)
            in_body=lambda b: "input" in b and not any(k in b for k in _RESPONSES_ONLY),
            log_id="embd-",
        ),
        Spec(
            "pooling", "/pooling", "pooling",
            body=lambda p, d, n, s: {"input": p}, usage=_pooling_usage, log_id="pooling-",
        ),
        Spec(
            "classify", "/classify", "classify",
            body=lambda p, d, n, s: {"input": p}, usage=_pooling_usage, log_id="classify-",
        ),
        Spec(
            "score", "/score", "score",
            body=lambda p, d, n, s: {"queries": p, "documents": d}, usage=_pooling_usage,
            in_body=lambda b: "queries" in b or "text_1" in b,
            log_id="score-",  # rerank runs through score: its requests too
        ),
        Spec(
            "rerank", "/rerank", "score",
            body=lambda p, d, n, s: {"query": p, "documents": d}, usage=_pooling_usage,
            in_body=lambda b: "query" in b and "documents" in b,
        ),
    )
}  # fmt: skip

GENERATE = tuple(name for name, spec in SPECS.items() if spec.generates)
SAMPLING = frozenset(name for name, spec in SPECS.items() if spec.sampling)
BY_PATH = {spec.path: name for name, spec in SPECS.items()}


def known(name: str) -> str:
    """`name`, if it is an endpoint (a pydantic validator)."""
    if name not in SPECS:
        raise ValueError(f"unknown endpoint {name!r} (known: {', '.join(SPECS)})")
    return name


def recognise(body: Json, path: str | None = None) -> str | None:
    """Which endpoint a logged request went to: by its path when the log has one, else by the
    fields of its body."""
    if path is not None:
        try:
            path = urlsplit(path).path  # a URL or a path
        except ValueError:  # not a URL ("http://[")
            path = None
        for name, spec in SPECS.items():
            if path in (spec.path, "/v1" + spec.path):
                return name
    # the most specific bodies first
    for name in ("score", "rerank", "messages", "chat", "responses", "embeddings", "completions"):
        if SPECS[name].in_body(body):
            return name
    return None


def from_log_id(request_id: str) -> str | None:
    """Which endpoint vLLM's request log means by a request id (longest prefix first)."""
    for name, spec in sorted(SPECS.items(), key=lambda item: -len(item[1].log_id or "")):
        if spec.log_id and request_id.startswith(spec.log_id):
            return name
    return None


class FirstToken:
    """A stream's first-token event, found as its chunks go by: each `data:` event is parsed
    until one shows the first token (`Spec.starts`: a Responses stream sends
    `response.created` and more before any token), then nothing more is read."""

    MAX_LINE = 65536  # a line longer than this is no event worth waiting for

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.found = False
        self._pending = b""

    def feed(self, chunk: bytes) -> bool:
        """Whether the first token is in what was fed so far."""
        if self.found:
            return True
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            try:
                event = json.loads(line[5:])
            except ValueError:
                continue  # `[DONE]`, or not JSON
            if isinstance(event, dict) and self.spec.starts(event):
                self.found, self._pending = True, b""
                return True
        if len(self._pending) > self.MAX_LINE:
            self._pending = b""
        return False


def failed(event: Json) -> Any:
    """The error a stream event carries, if any (each API has its own form)."""
    if event.get("type") in ("error", "response.failed"):
        return event.get("error") or event.get("response") or event
    return event.get("error")
