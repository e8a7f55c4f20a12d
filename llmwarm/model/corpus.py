"""Turn a profile into concrete, deterministic warm-up requests.

`Corpus` is one warm-up's requests: the profile (resolved for its engine), the tokenizer that
sizes its prompts, the model name, and the warm-up's cache salt. Every request carries the
salt (vLLM's `cache_salt`, which every endpoint takes): the prefix-cache blocks a warm-up fills
can match no request but that warm-up's own, so a user never hits them, a re-warm's round 1 is
as cold as the first warm-up's, and no cache users share has to be reset.

Pure: needs only a tokenizer (for exact prompt lengths), never vLLM itself.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmwarm.model import endpoints, features
from llmwarm.model.convergence import DRIFT_ROUNDS, MIN_ROUND_SAMPLES, Verdict
from llmwarm.model.features import Feature
from llmwarm.model.kinds import PLAIN, Kind
from llmwarm.model.profile import Bucket, Profile

_SYLLABLES = (
    "ka lo mi ne ru sa te vi bo da fe gu hi jo ku la me no pa qui re si to un va we xa yo zu "
    "ar be ce di ek fo ga ho il ja ki lu ma ni om pe ri su ti ul ve wo xi ya ze"
).split()


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


DP_RANK_HEADER = "X-data-parallel-rank"  # read by vLLM's OpenAI serving (`_get_data_parallel_rank`)


@dataclass(frozen=True)
class WarmRequest:
    """One HTTP request of the warm-up, and where it belongs."""

    bucket: str
    round: int
    kind: Kind
    body: dict[str, Any] = field(hash=False)
    rank: int | None = None  # the data-parallel rank it must run on (None: any)

    @property
    def headers(self) -> dict[str, str]:
        """Its own headers: the rank it is pinned to, as vLLM's router reads it."""
        return {} if self.rank is None else {DP_RANK_HEADER: str(self.rank)}

    @property
    def endpoint(self) -> str:
        return self.kind.endpoint

    @property
    def stream(self) -> bool:
        return self.kind.stream

    @property
    def path(self) -> str:
        return endpoints.SPECS[self.endpoint].path

    @property
    def sequences(self) -> int:
        """The sequences it decodes: `n` a prompt, for each prompt of a batch."""
        prompt = self.body.get("prompt")
        batch = features.SPECS["prompt_batch"].in_body(self.body)
        prompts = len(prompt) if batch and isinstance(prompt, list) else 1
        n = self.body.get("n")
        return prompts * (n if isinstance(n, int) and n > 1 else 1)


@dataclass(frozen=True)
class Batch:
    """Requests sent at once: one bucket, one round, one request kind."""

    bucket: Bucket
    round: int
    kind: Kind
    requests: tuple[WarmRequest, ...]


def seeded_rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# Pseudo-words of one to two syllables (3,660 of them), picked at C speed: a prompt built one
# syllable at a time costs milliseconds of Python per request (docs/benchmarks.md, "Figures
# behind the defaults").
_WORDS = _SYLLABLES + [a + b for a in _SYLLABLES for b in _SYLLABLES]


def _seed_text(n_tokens: int, rng: random.Random, pool: Sequence[str]) -> str:
    if not pool:
        # Pseudo-words from the first token on: no two prompts share a prefix, so a request
        # with prompts of its own prefills all of them (`Corpus.prompts_of` says which).
        return " ".join(rng.choices(_WORDS, k=n_tokens + 8))
    # The user's prompts, from a random one on, joined until surely long enough (a token
    # is at least one character).
    start = rng.randrange(len(pool))
    parts: list[str] = []
    length = 0
    i = start
    while length < n_tokens * 2 and (i - start) < len(pool) * 50:
        text = pool[i % len(pool)]
        parts.append(text)
        length += len(text)
        i += 1
    return " ".join(parts)


def make_prompt(
    tokenizer: Tokenizer, n_tokens: int, rng: random.Random, pool: Sequence[str] = ()
) -> str:
    """A text of (as near as the tokenizer allows) exactly `n_tokens` tokens."""
    text = _seed_text(n_tokens, rng, pool)
    for _ in range(4):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == n_tokens:
            break
        if len(ids) < n_tokens:
            text += " " + " ".join(rng.choices(_SYLLABLES, k=n_tokens - len(ids)))
        else:
            text = tokenizer.decode(ids[:n_tokens])
    return text


def _kinds(
    profile: Profile, chosen: Sequence[Feature], endpoint_names: Sequence[str]
) -> list[Kind]:
    out = []
    for feature in chosen:
        for endpoint in endpoint_names:
            modes = profile.stream if endpoints.SPECS[endpoint].streamable else [False]
            out += [
                Kind.of(endpoint, stream, feature)
                for stream in modes
                if feature.spec.takes(endpoint, stream)
            ]
    return out


def _features(profile: Profile, bucket: Bucket) -> list[Feature]:
    return profile.features.features() if bucket.name in profile.feature_buckets() else [PLAIN]


def kinds(profile: Profile, bucket: Bucket) -> list[Kind]:
    """Every request kind this bucket sends (endpoint x streaming x feature), in order.

    An endpoint that cannot stream (pooling) sends one unary kind whatever `stream` says.
    """
    return _kinds(profile, _features(profile, bucket), profile.endpoint_names())


def round_kinds(profile: Profile, bucket: Bucket) -> list[Kind]:
    """The kind every round of this bucket repeats until its latency settles (a list of one;
    empty when no endpoint takes it): the first endpoint (that takes it) with the bucket's
    first feature (plain, unless the profile's features leave it out), streamed when the
    rule's metric is read from a stream (TTFT, TPOT). What must settle is the engine's latency
    at the bucket's shape, which every endpoint and streaming mode shares; an endpoint's, a
    mode's or a feature's own cold path is paid once (`sweep_kinds`)."""
    first = _features(profile, bucket)[:1]
    streamed = profile.convergence.metric != "e2e"
    for endpoint in profile.endpoint_names():  # the first that takes it (tools: chat)
        if found := _kinds(profile, first, [endpoint]):
            return sorted(found, key=lambda kind: kind.stream != streamed)[:1]
    return []


def sweep_kinds(profile: Profile, bucket: Bucket, sent: Iterable[Kind] | None = None) -> list[Kind]:
    """The kinds the bucket's sweep (after round 1) and check (after its last round) send,
    all at once: those of its kinds that neither its rounds nor the warm-up before it sent
    (`sent`, the kinds the buckets that ran before it sent; None: every earlier bucket's, as
    when all of them run). A kind's own cold path (an endpoint's template and parser, a
    streaming mode, a feature's sampler or grammar) is paid once whatever the shape, as
    coverage counts it (`llmwarm.traffic.coverage`); the engine's latency at each shape is what
    every bucket's rounds warm. So the first bucket sweeps every endpoint and mode (and a feature
    bucket its features), and a later bucket only what is new at it."""
    if sent is None:
        names = [b.name for b in profile.buckets]
        before = profile.buckets[: names.index(bucket.name)] if bucket.name in names else []
        sent = [kind for earlier in before for kind in kinds(profile, earlier)]
    skip = {*sent, *round_kinds(profile, bucket)}
    return [kind for kind in kinds(profile, bucket) if kind not in skip]


# Output tokens of a sweep (or check) request, at most: an endpoint's or a feature's own cold
# path (its template, parser, sampler, grammar, stream) runs at a request's start, in its
# prefill step, whose sampler gives the first token, and its first decode step (the first
# whose sampler sees an output token: penalties, a grammar's next state, a stop string over
# the text so far; where the engine speculates, the first verification of drafts). The steps
# after it run the same code over one more token; the bucket's full decode length is what
# its rounds repeat. All at once, the sweep decodes some 50 requests a step, so each step more
# is paid by every one of them (docs/benchmarks.md, "Figures behind the defaults").
SWEEP_MAX_TOKENS = 2
# Prompt tokens of a sweep (or check) request, at most: none of those cold paths depends on the
# prompt's length (an endpoint's template adds its own tokens, a chat template often dozens),
# and every prompt length's prefill is the prefill sweep's and the rounds' to warm. Sent all at
# once, the sweep's requests are one prefill step, whose size each token of theirs multiplies
# (docs/benchmarks.md, "Figures behind the defaults").
SWEEP_PROMPT_TOKENS = 4
# The round whose prompts the later rounds of a decode-measured bucket send again (`prompts_of`).
REPEATED_FROM = 2


@dataclass(frozen=True)
class Corpus:
    """One warm-up's requests: `profile` resolved for its engine, prompts sized by `tokenizer`,
    `model` in every body, `salt` as every request's `cache_salt` (None: no salt), every
    request pinned to data-parallel rank `rank` (None: wherever vLLM puts it)."""

    profile: Profile
    tokenizer: Tokenizer
    model: str
    salt: str | None = None
    rank: int | None = None

    def _body(self, kind: Kind, prompts: list[str], bucket: Bucket) -> dict[str, Any]:
        endpoint = endpoints.SPECS[kind.endpoint]
        prompt, documents = prompts[0], prompts[1:]
        body: dict[str, Any] = {
            "model": self.model,
            **endpoint.body(prompt, documents, bucket.max_tokens, kind.stream),
        }
        if endpoint.generates:
            body["temperature"] = 0.0
        if endpoint.ignore_eos and not kind.feature.spec.constrained:
            # A warm-up must run its full decode length; a random model may emit EOS at once.
            body["ignore_eos"] = True
        if self.salt is not None:
            body["cache_salt"] = self.salt
        if form := kind.feature.spec.form:  # the prompt in another form (token IDs, a batch)
            body["prompt"] = form(prompts, self._encode)
        return features.apply(kind.feature, kind.endpoint, self.profile.features, body)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def batch(
        self, bucket: Bucket, kind: Kind, round_: int, repeat: int = 0, again: int | None = None
    ) -> Batch:
        """`concurrency` requests of one kind for one round of one bucket (`repeat`: its n-th
        repetition within the round, with prompts of its own; `again`: the earlier round whose
        first batch's prompts to send instead, see `prompts_of`)."""
        # score and rerank send a query and `documents` documents, each of the bucket's length
        texts = 1 + (bucket.documents if endpoints.SPECS[kind.endpoint].task == "score" else 0)
        texts = max(texts, kind.feature.spec.texts(self.profile.features))
        pool = self.profile.prompts.texts
        requests = []
        for i in range(bucket.concurrency):
            if again is None:
                parts = (bucket.name, round_, kind, i) + ((repeat,) if repeat else ())
            else:
                parts = (bucket.name, again, kind, i)
            rng = seeded_rng(self.profile.seed, *parts)
            prompts = [
                make_prompt(self.tokenizer, bucket.prompt_tokens, rng, pool) for _ in range(texts)
            ]
            requests.append(
                WarmRequest(
                    bucket=bucket.name,
                    round=round_,
                    kind=kind,
                    body=self._body(kind, prompts, bucket),
                    rank=self.rank,
                )
            )
        return Batch(bucket=bucket, round=round_, kind=kind, requests=tuple(requests))

    def prompts_of(self, round_: int) -> int | None:
        """The earlier round whose prompts round `round_` sends again; None: prompts never sent.

        Round 1 (the cold one) and round 2 (the first warm one) send prompts of their own: the
        bucket's TTFT and e2e, cold and warm, are theirs. When the rule measures decode
        (`tpot`), the rounds after them only wait for it to settle, and send round 2's prompts
        again: their prefill comes from the prefix cache (the warm-up's own blocks, by its
        salt) in whole blocks, and a round costs little more than its decode, the same steps
        over the same context (SmolLM2 on vLLM's CPU build, whose blocks hold 128 tokens: the
        512-token bucket's first token 0.46 s instead of 1.5, in a round of 2.9 s). Under
        another metric every round measures the prefill, with prompts never sent."""
        if self.profile.convergence.metric == "tpot" and round_ > REPEATED_FROM:
            return REPEATED_FROM
        return None

    def round_batches(self, bucket: Bucket, round_: int, repeat: int = 0) -> list[Batch]:
        """One round of one bucket: a batch per round kind, sent one after another."""
        again = self.prompts_of(round_)
        return [
            self.batch(bucket, kind, round_, repeat, again)
            for kind in round_kinds(self.profile, bucket)
        ]

    def sweep_requests(
        self, bucket: Bucket, round_: int, sent: Iterable[Kind] | None = None
    ) -> list[WarmRequest]:
        """The bucket's sweep (or check) after `round_`: every sweep kind's batch (`sent`: as
        `sweep_kinds` takes it), to be sent at once, each request at most `SWEEP_MAX_TOKENS`
        long, its prompts at most `SWEEP_PROMPT_TOKENS`. Empty when nothing is left to sweep."""
        short = bucket.model_copy(
            update={
                "max_tokens": min(bucket.max_tokens, SWEEP_MAX_TOKENS),
                "prompt_tokens": min(bucket.prompt_tokens, SWEEP_PROMPT_TOKENS),
            }
        )
        return [
            request
            for kind in sweep_kinds(self.profile, bucket, sent)
            for request in self.batch(short, kind, round_).requests
        ]


class WordTokenizer:
    """A stand-in when the server's tokenizer is not at hand: one token a whitespace-separated
    word, so prompt lengths are approximate (a pseudo-word is one to three real tokens)."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = []
        for word in text.split():
            if word not in self.vocab:
                self.vocab[word] = len(self.words)
                self.words.append(word)
            ids.append(self.vocab[word])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[i] for i in ids)


def sampled_batches(verdict: Verdict | None) -> int:
    """How many batches carrying the metric a bucket's next round sends.

    The rule measures a host's noise between a round's batches (`convergence`). A bucket
    sends one batch a round while the fixed `spread` decides (a quiet host: its rounds
    agree), and `MIN_ROUND_SAMPLES` from the round after its window first failed with no
    noise measured: a noisy host, or a bucket still warming, is then told apart at the cost
    of the batches it needs, and a quiet one never pays them. Narrow buckets too: one request
    at a time is no cheap batch on a real model (a 512-token prompt's prefill takes seconds on
    a CPU), and a streamed request's time per token already averages its gaps.

    Two failures first get one more round of one batch, which tells them apart at a third of
    the batches' cost: a window whose rounds but its oldest agree (a step: round 1 was cold, and
    the next window leaves it out), and one that failed the drift test only, over fewer than
    `DRIFT_ROUNDS` rounds (two steps the same way happen by chance in a third of quiet series;
    the fourth round tells them from a drift).
    """
    if verdict is not None and verdict.window_full and verdict.noise is None:
        if verdict.stepped or 0 < verdict.drifting < DRIFT_ROUNDS:
            return 1
        return MIN_ROUND_SAMPLES
    return 1


def requests_per_round(profile: Profile, bucket: Bucket) -> int:
    """A round's requests while one batch carries the metric (on a noisy host, it goes twice
    more: `sampled_batches`)."""
    return len(round_kinds(profile, bucket)) * bucket.concurrency


def requests_per_sweep(profile: Profile, bucket: Bucket) -> int:
    return len(sweep_kinds(profile, bucket)) * bucket.concurrency
