"""Build a profile from real traffic: OpenAI request bodies (JSONL) and vLLM request logs.

Accepted, line by line, in one file or mixed:
  * a JSON object: an OpenAI completions or chat request body, optionally with `timestamp`
    (seconds) for concurrency;
  * vLLM's `--enable-log-requests` lines: `Received request ID: params: SamplingParams(...)`
    (INFO) and, at `--log-level DEBUG`, `Request ID details: ... prompt_token_ids: [...]` and
    `Request ID JSON body: {...}`.
Prompt lengths come from token ids where the log has them, else from text at ~4 characters a
token. Lengths and concurrency are rounded up to powers of two; the most frequent buckets are
kept until they cover the asked share of requests. Pure: no vLLM.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from llmwarm.errors import ProfileError
from llmwarm.model import endpoints, features
from llmwarm.traffic.skeleton import texts_length

CHARS_PER_TOKEN = 4
DEFAULT_PROMPT_TOKENS = 128  # when a log line tells no prompt length

_RECEIVED = re.compile(
    r"Received request (\S+): params: (?:Sampling|Pooling)Params\((.*)\), lora_request: (.*)\."
)
_DETAILS = re.compile(r"Request (\S+) details: .*prompt_token_ids: \[([^\]]*)\]")
_BODY = re.compile(r"Request (\S+) JSON body: (\{.*\})\s*$")
_VLLM_TIME = re.compile(r"(\d\d-\d\d \d\d:\d\d:\d\d)")
_PARAM = re.compile(r"(\w+)=((?:\[[^\]]*\])|(?:[^,()]+(?:\([^)]*\))?))")


@dataclass
class Observed:
    endpoint: str | None = None
    stream: bool | None = None
    prompt_tokens: int | None = None
    max_tokens: int | None = None
    features: set[str] = field(default_factory=set)
    timestamp: float | None = None


def _text_chars(body: dict[str, Any]) -> int:
    """The length of a request body's prompt text, whatever its API (chat parts: their text;
    a string the gate's `Skeleton` skipped: its length)."""
    parts: list[Any] = []
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            parts += [p.get("text") for p in content if isinstance(p, dict)]
        else:
            parts.append(content)
    batches = []  # a batch's strings are counted in C (`texts_length`), however many
    for key in ("prompt", "input", "query", "queries", "documents", "text_1", "text_2"):
        value = body.get(key)
        if isinstance(value, list):
            batches.append(value)
        else:
            parts.append(value)
    texts = [[p for p in parts if isinstance(p, str)], *batches]
    counted = [texts_length(t) for t in texts]
    chars, strings = sum(c for c, _ in counted), sum(n for _, n in counted)
    return chars + max(0, strings - 1)


# The fields read as numbers or flags, typed so in vLLM's request models: pydantic (lax mode)
# takes "0.7" for a float, "2" for an int and "true" for a bool, and so does `lax`.
_NUMBERS = (
    "temperature", "top_p", "top_k", "min_p", "n", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "max_tokens", "max_completion_tokens", "max_output_tokens",
    "top_logprobs", "prompt_logprobs", "timestamp",
)  # fmt: skip
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


def _number(value: Any) -> int | float | None:
    """A number as pydantic's lax mode reads one (None: none it would take)."""
    if isinstance(value, bool | int | float):
        return None if value != value else value  # NaN compares as nothing
    if not isinstance(value, str):
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    if number != number:
        return None
    return int(number) if number.is_integer() else number


def _flag(value: Any) -> Any:
    """A flag as pydantic's lax mode reads one (else the value as it is)."""
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    return value


def lax(body: dict[str, Any]) -> dict[str, Any]:
    """The body with the fields llmwarm reads as vLLM would read them (`_NUMBERS`, `stream`,
    `logprobs`: a number on completions, a flag on chat)."""
    read = dict(body)
    for key in _NUMBERS:
        if key in read:
            read[key] = _number(read[key])
    for key in ("stream", "logprobs"):
        if key in read:
            flag = _flag(read[key])
            read[key] = _number(flag) if isinstance(flag, str) else flag
    return read


def from_body(body: dict[str, Any]) -> Observed:
    """One logged request body (read as vLLM reads it: `lax`); `path` (or `url`) beside it
    names its endpoint, if there."""
    body = lax(body)
    path = body.get("path") or body.get("url")
    endpoint = endpoints.recognise(body, path if isinstance(path, str) else None)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        tokens = len(prompt)  # token ids
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        tokens = sum(len(p) for p in prompt if isinstance(p, list))  # a batch of token ids
    else:
        tokens = max(1, math.ceil(_text_chars(body) / CHARS_PER_TOKEN))
    max_tokens = (
        body.get("max_tokens") or body.get("max_completion_tokens") or body.get("max_output_tokens")
    )
    return Observed(endpoint, bool(body.get("stream")), tokens, max_tokens,
                    features.in_body(body), body.get("timestamp"))  # fmt: skip


def _from_params(params: str, lora: str) -> Observed:
    logged = features.Logged(params, {k: v.strip() for k, v in _PARAM.findall(params)}, lora)
    max_tokens = int(logged.number("max_tokens")) or None
    return Observed(max_tokens=max_tokens, features=features.in_log(logged))


def _vllm_time(line: str) -> float | None:
    match = _VLLM_TIME.search(line)
    if match is None:
        return None
    # vLLM logs no year; any fixed one keeps the differences right.
    return datetime.strptime("2000-" + match.group(1), "%Y-%m-%d %H:%M:%S").timestamp()


def parse(lines: list[str]) -> tuple[list[Observed], int]:
    """The requests the lines describe, and how many lines were not understood."""
    by_id: dict[str, Observed] = {}
    plain: list[Observed] = []
    skipped = 0
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                plain.append(from_body(json.loads(line)))
            except (ValueError, AttributeError, TypeError):
                skipped += 1
            continue
        if m := _BODY.search(line):
            try:
                seen = from_body(json.loads(m.group(2)))
            except (ValueError, AttributeError, TypeError):
                skipped += 1
                continue
            old = by_id.get(m.group(1))
            seen.timestamp = _vllm_time(line) if old is None else old.timestamp
            if old is not None:
                seen.features |= old.features
                seen.prompt_tokens = old.prompt_tokens or seen.prompt_tokens
            by_id[m.group(1)] = seen
        elif m := _DETAILS.search(line):
            obs = by_id.setdefault(m.group(1), Observed(timestamp=_vllm_time(line)))
            obs.prompt_tokens = len([t for t in m.group(2).split(",") if t.strip()])
        elif m := _RECEIVED.search(line):
            seen = _from_params(m.group(2), m.group(3))
            obs = by_id.setdefault(m.group(1), Observed(timestamp=_vllm_time(line)))
            obs.endpoint = obs.endpoint or endpoints.from_log_id(m.group(1))
            obs.features |= seen.features
            obs.max_tokens = obs.max_tokens or seen.max_tokens
        else:
            skipped += 1
    return plain + list(by_id.values()), skipped


def size_class(value: int, low: int = 16) -> int:
    """The power of two at or above `value` (at least `low`): how request sizes are grouped."""
    return max(low, 1 << max(0, math.ceil(math.log2(max(1, value)))))


def _concurrency(requests: list[Observed]) -> list[int]:
    """Per request: a power-of-two class of the requests that arrived in the same second."""
    seconds = Counter(int(r.timestamp) for r in requests if r.timestamp is not None)
    return [
        size_class(seconds[int(r.timestamp)], low=1) if r.timestamp is not None else 1
        for r in requests
    ]


def profile_data(
    classes: Counter[tuple[int, int, int]],
    features_seen: Counter[str],
    endpoints_seen: set[str],
    streams_seen: set[bool],
    coverage: float,
) -> tuple[dict[str, Any], int]:
    """A profile (YAML-ready data) from requests counted by (prompt, concurrency, output)
    class: the most frequent classes until they cover `coverage` of the requests, and how
    many requests they cover."""
    total = sum(classes.values())
    kept, covered = [], 0
    for (p, c, o), count in classes.most_common():
        kept.append({"prompt_tokens": p, "concurrency": c, "max_tokens": o})
        covered += count
        if covered >= coverage * total:
            break
    # lora needs adapter names, which no log line gives: said in the comment instead
    use = [
        "greedy",
        *(f for f in features.SPECS if f not in ("greedy", "lora") and features_seen[f]),
    ]
    names = [name for name in endpoints.SPECS if name in endpoints_seen]
    streams = sorted(streams_seen, reverse=True)
    data: dict[str, Any] = {
        **({"endpoints": names} if names else {}),  # none seen: what the engine serves
        "stream": streams or [True, False],
        "buckets": kept,
        "features": {"use": use},
    }
    if True not in data["stream"]:
        data["convergence"] = {"metric": "e2e"}
    return data, covered


def build(lines: list[str], coverage: float, source: str) -> tuple[dict[str, Any], str]:
    """A profile (as YAML-ready data) and a comment saying what it covers."""
    requests, skipped = parse(lines)
    if not requests:
        raise ProfileError(
            f"{source}: no requests found",
            problems=[(source, f"{skipped} lines, none an OpenAI request body or a vLLM "
                       "request log line")],
        )  # fmt: skip
    classes = Counter(
        (size_class(r.prompt_tokens or DEFAULT_PROMPT_TOKENS), c, size_class(r.max_tokens or 16))
        for r, c in zip(requests, _concurrency(requests), strict=True)
    )
    seen = Counter(f for r in requests for f in r.features)
    data, covered = profile_data(
        classes, seen, {r.endpoint for r in requests if r.endpoint},
        {r.stream for r in requests if r.stream is not None}, coverage,
    )  # fmt: skip
    use = data["features"]["use"]
    unknown = sum(1 for r in requests if r.prompt_tokens is None)
    lines_out = [
        f"built by `llmwarm profile from-log` from {source}: {len(requests)} requests"
        + (f", {skipped} lines skipped" if skipped else ""),
        f"buckets cover {covered / len(requests):.1%} of requests (asked {coverage:.0%})",
        "features seen: "
        + (", ".join(f"{f} {seen[f] / len(requests):.0%}" for f in use[1:]) or "none"),
    ]
    if seen["lora"]:
        lines_out.append(f"LoRA requests seen ({seen['lora']}): list adapters under features.lora")
    if unknown:
        lines_out.append(
            f"{unknown} requests had no prompt length (vLLM INFO lines): assumed "
            f"{DEFAULT_PROMPT_TOKENS} tokens; --log-level DEBUG logs the token ids"
        )
    return data, "\n".join(f"# {line}" for line in lines_out)
