"""Turn a profile into concrete, deterministic warm-up requests.

Pure: needs only a tokenizer (for exact prompt lengths), never vLLM itself.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmwarm.errors import ProfileError
from llmwarm.profile import Bucket, Profile

# Tokens a chat template may add around one user message; kept free so chat prompts fit too.
CHAT_TEMPLATE_ALLOWANCE = 64

_SYLLABLES = (
    "ka lo mi ne ru sa te vi bo da fe gu hi jo ku la me no pa qui re si to un va we xa yo zu "
    "ar be ce di ek fo ga ho il ja ki lu ma ni om pe ri su ti ul ve wo xi ya ze"
).split()


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class WarmRequest:
    """One HTTP request of the warm-up, and where it belongs."""

    bucket: str
    round: int
    kind: str  # e.g. "chat-stream"
    path: str
    stream: bool
    body: dict[str, Any] = field(hash=False)


@dataclass(frozen=True)
class Batch:
    """Requests sent at once: one bucket, one round, one request kind."""

    bucket: Bucket
    round: int
    kind: str
    requests: tuple[WarmRequest, ...]


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def make_prompt(tokenizer: Tokenizer, n_tokens: int, rng: random.Random) -> str:
    """A text of (as near as the tokenizer allows) exactly `n_tokens` tokens.

    Random pseudo-words from the first token on, so no two prompts share a prefix and the
    prefix cache cannot make a later round trivially fast.
    """
    words = [
        "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))
        for _ in range(n_tokens + 8)
    ]
    text = " ".join(words)
    for _ in range(4):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == n_tokens:
            break
        if len(ids) < n_tokens:
            text += " " + " ".join(rng.choice(_SYLLABLES) for _ in range(n_tokens - len(ids)))
        else:
            text = tokenizer.decode(ids[:n_tokens])
    return text


def kinds(profile: Profile) -> list[tuple[str, bool]]:
    """The (endpoint, stream) pairs each round sends, in order."""
    return [(endpoint, stream) for endpoint in profile.endpoints for stream in profile.stream]


def kind_name(endpoint: str, stream: bool) -> str:
    return f"{endpoint}-stream" if stream else endpoint


def check_fits(profile: Profile, max_model_len: int) -> None:
    """Every bucket's prompt and output must fit the engine's context window."""
    problems = []
    for i, bucket in enumerate(profile.buckets):
        need = bucket.prompt_tokens + bucket.max_tokens
        if "chat" in profile.endpoints:
            need += CHAT_TEMPLATE_ALLOWANCE
        if need > max_model_len:
            problems.append(
                (
                    f"buckets.{i}",
                    f"prompt_tokens + max_tokens = {bucket.prompt_tokens + bucket.max_tokens}"
                    + (
                        f" (+{CHAT_TEMPLATE_ALLOWANCE} for the chat template)"
                        if "chat" in profile.endpoints
                        else ""
                    )
                    + f" exceeds the engine's max_model_len {max_model_len}",
                )
            )
    if problems:
        raise ProfileError("profile does not fit the engine", problems=problems)


def _body(endpoint: str, stream: bool, prompt: str, bucket: Bucket, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": bucket.max_tokens,
        # A warm-up must run its full decode length; a random model may emit EOS at once.
        "ignore_eos": True,
        "temperature": 0.0,
    }
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def round_batches(
    profile: Profile, bucket: Bucket, round_: int, tokenizer: Tokenizer, model: str
) -> list[Batch]:
    """One round of one bucket: a batch per request kind, `concurrency` requests each."""
    batches = []
    for endpoint, stream in kinds(profile):
        kind = kind_name(endpoint, stream)
        requests = []
        for i in range(bucket.concurrency):
            rng = _rng(profile.seed, bucket.name, round_, kind, i)
            prompt = make_prompt(tokenizer, bucket.prompt_tokens, rng)
            requests.append(
                WarmRequest(
                    bucket=bucket.name,
                    round=round_,
                    kind=kind,
                    path=_PATHS[endpoint],
                    stream=stream,
                    body=_body(endpoint, stream, prompt, bucket, model),
                )
            )
        batches.append(Batch(bucket=bucket, round=round_, kind=kind, requests=tuple(requests)))
    return batches
