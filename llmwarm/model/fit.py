"""Fitting a profile to an engine: what only the started (or configured) engine knows.

`EngineShape` is what llmwarm needs of an engine's configuration (limits, CUDA-graph sizes,
LoRA, the endpoints it serves, whether it takes images); `for_engine` resolves a profile
against it (its endpoints, its `auto` buckets, images for a vision model) and checks every
bucket and feature, raising the same `ProfileError`s as loading does, naming the same fields.
Pure: no vLLM (`llmwarm.backend.engine` builds the shape).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

from llmwarm.errors import ProfileError
from llmwarm.model import endpoints
from llmwarm.model.features import Features
from llmwarm.model.profile import Auto, Bucket, Prefill, Profile

logger = logging.getLogger(__name__)

# Tokens a chat template may add around one user message; kept free so chat prompts fit too.
CHAT_TEMPLATE_ALLOWANCE = 64


@dataclass(frozen=True)
class EngineShape:
    """The limits of a started (or configured) engine that a profile depends on."""

    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    cudagraph_capture_sizes: list[int] = field(default_factory=list)  # empty: no CUDA graphs
    lora: list[str] = field(default_factory=list)  # adapter names known to the server
    lora_enabled: bool = False
    chat_template_tools: bool = True  # False when the chat template is known to ignore tools
    kv_blocks: int | None = None  # known once the engine has profiled its memory
    block_size: int | None = None
    # the endpoints vLLM serves this model on (from its tasks); empty: not known (no engine)
    endpoints: frozenset[str] = frozenset()
    multimodal: bool = False  # the model takes images
    # Data parallelism: the DP ranks this API server warms (empty: no data parallelism), and
    # whether a request must name its rank (`X-data-parallel-rank`: vLLM's internal load
    # balancer fronts every rank; with external load balancing a server fronts its own only)
    dp_ranks: tuple[int, ...] = ()
    dp_pinned: bool = False
    # speculative decoding: draft tokens a step, as vLLM's configuration resolved them (it
    # fills them itself for MTP and draft models, and suffix decoding); 0: none
    spec_tokens: int = 0
    # the most log-probabilities a request may ask (vLLM's --max-logprobs; -1: no limit)
    max_logprobs: int = 20

    def ranks(self) -> list[int | None]:
        """The ranks a warm-up goes through, one after another (None: the one engine)."""
        return list(self.dp_ranks) or [None]


def doubling(low: int, high: int) -> list[int]:
    values, v = [], low
    while v <= high:
        values.append(v)
        v *= 2
    return values


def concurrency_classes(shape: EngineShape, limit: int) -> list[int]:
    """Batch sizes worth warming: on GPU, each CUDA-graph size a batch is padded to (for
    powers of two up to `limit`); without graphs, the powers of two themselves."""
    wanted = doubling(1, min(limit, shape.max_num_seqs))
    sizes = sorted(s for s in shape.cudagraph_capture_sizes if s <= shape.max_num_seqs)
    if not sizes:
        return wanted
    padded = {next((s for s in sizes if s >= c), c) for c in wanted}
    return sorted(padded)


def auto_buckets(auto: Auto, shape: EngineShape, chat: bool) -> list[Bucket]:
    """A prompt-length sweep at concurrency 1 and a concurrency sweep at the shortest prompt,
    interleaved, and one prompt past max_num_batched_tokens (chunked prefill), all within
    max_model_len."""
    room = shape.max_model_len - auto.max_tokens - (CHAT_TEMPLATE_ALLOWANCE if chat else 0)
    prompts = doubling(auto.min_prompt_tokens, min(auto.max_prompt_tokens, room))
    limit = auto.max_concurrency or shape.max_num_seqs
    lengths = [(p, 1) for p in prompts]
    widths = [(auto.min_prompt_tokens, c) for c in concurrency_classes(shape, limit) if c > 1]
    # the shortest single request first, then a wider batch and a longer prompt in turn: when
    # time cuts the (optional) sweep, both ranges are covered as far as it got
    rows = lengths[:1] + [
        row for pair in itertools.zip_longest(widths, lengths[1:]) for row in pair if row
    ]
    chunked = shape.max_num_batched_tokens + 16
    if auto.chunked_prefill and chunked <= room and chunked not in prompts:
        rows.append((chunked, 1))
    # optional, after the profile's own buckets: extra coverage as budget.optional_share allows
    return [
        Bucket(name=f"auto-p{p}-c{c}-o{auto.max_tokens}", prompt_tokens=p, concurrency=c,
               max_tokens=auto.max_tokens, optional=True, priority=-1)
        for p, c in rows
        if p <= room
    ]  # fmt: skip


def prefill_room(shape: EngineShape, endpoint: str) -> int:
    """The longest prompt a request of `endpoint` can have: its one output token and, through a
    chat template, the template's tokens within --max-model-len."""
    spec = endpoints.SPECS[endpoint]
    room = shape.max_model_len - (1 if spec.generates else 0)
    return room - (CHAT_TEMPLATE_ALLOWANCE if spec.templated else 0)


def prefill_counts(prefill: Prefill, shape: EngineShape, endpoint: str) -> list[int]:
    """The prefill sweep's prompt token counts from `min_tokens`: the powers of two and every
    CUDA-graph capture size (on GPU a step is padded to one) up to `max_tokens` (default: a
    step's limit, --max-num-batched-tokens), that limit itself and, by default, the longest
    prompt that fits (prefilled in chunks). None longer than fits (`prefill_room`)."""
    room = prefill_room(shape, endpoint)
    top = min(prefill.max_tokens or shape.max_num_batched_tokens, room)
    counts = {top, *doubling(prefill.min_tokens, top), *shape.cudagraph_capture_sizes}
    if prefill.max_tokens is None:
        counts.add(room)  # past a step's limit: prefilled in chunks
    last = room if prefill.max_tokens is None else top
    return sorted(c for c in counts if prefill.min_tokens <= c <= last)


def _prefill_problems(prefill: Prefill | None, shape: EngineShape, endpoint: str) -> Problems:
    if prefill is None:
        return []
    room = prefill_room(shape, endpoint)
    return [
        (f"prefill.{name}", f"{value} tokens do not fit a {endpoint} request here: at most "
         f"{room} (--max-model-len {shape.max_model_len})")
        for name, value in (("min_tokens", prefill.min_tokens), ("max_tokens", prefill.max_tokens))
        if value is not None and value > room
    ]  # fmt: skip


def with_adapters(profile: Profile, adapters: list[str]) -> Profile:
    """The profile, warming these LoRA adapters too (the `lora` feature), e.g. adapters loaded
    at run time before a re-warm."""
    if not adapters:
        return profile
    features = profile.features
    use = features.use if "lora" in features.use else [*features.use, "lora"]
    lora = list(dict.fromkeys([*features.lora, *adapters]))
    return profile.model_copy(
        update={"features": features.model_copy(update={"use": use, "lora": lora})}
    )


def for_adapter(profile: Profile, adapter: str) -> Profile:
    """The warm-up of one LoRA adapter loaded at run time: the profile's feature buckets (the
    buckets it crosses features with), each sending the `lora` feature on this adapter, its
    rounds too; no KV-cache fill, no prefill sweep (the base model's: warm already)."""
    names = profile.feature_buckets()
    features = profile.features.model_copy(
        update={"use": ["lora"], "lora": [adapter], "buckets": sorted(names)}
    )
    return profile.model_copy(
        update={
            "buckets": [b for b in profile.buckets if b.name in names],
            "features": features,
            "kv_fill": None,
            "prefill": None,
        }
    )


Problems = list[tuple[str, str]]


def _endpoints_for(profile: Profile, shape: EngineShape, problems: Problems) -> list[str]:
    """The endpoints to warm: the profile's, each one the engine must serve, or by default
    every one it serves (the generate ones when the engine is not known)."""
    if not shape.endpoints:
        return profile.endpoint_names()
    served = [name for name in endpoints.SPECS if name in shape.endpoints]
    if profile.endpoints is None:
        return served
    for i, name in enumerate(profile.endpoints):
        if name not in shape.endpoints:
            problems.append(
                (f"endpoints.{i}", f"this model does not serve {name!r} (it serves: "
                 f"{', '.join(served) or 'none'}); leave `endpoints` out to warm what it serves")
            )  # fmt: skip
    return list(profile.endpoints)


def _too_long(buckets: list[Bucket], chosen: list[str], shape: EngineShape) -> Problems:
    specs = [endpoints.SPECS[name] for name in chosen]
    # A chat template wraps messages (and a Responses input); a cross-encoder scores a query
    # and a document in one sequence; only generate endpoints add output tokens.
    extra = CHAT_TEMPLATE_ALLOWANCE if any(s.templated for s in specs) else 0
    texts = 2 if any(s.task == "score" for s in specs) else 1
    generates = any(s.generates for s in specs)
    what = "2 x prompt_tokens (query and document)" if texts == 2 else "prompt_tokens"
    what += " + max_tokens" if generates else ""
    problems = []
    for bucket in buckets:
        need = bucket.prompt_tokens * texts + (bucket.max_tokens if generates else 0)
        if need + extra > shape.max_model_len:
            problems.append(
                (bucket.row or "auto", f"{bucket.name}: {what} = {need}"
                 + (f" (+{extra} for the chat template)" if extra else "")
                 + f" exceeds the engine's max_model_len {shape.max_model_len}")
            )  # fmt: skip
    return problems


def _feature_problems(features: Features, chosen: list[str], shape: EngineShape) -> Problems:
    problems = []
    if "tools" in features.use:
        if "chat" not in chosen:
            problems.append(("features.use", "`tools` needs the chat endpoint in `endpoints`"))
        if not shape.chat_template_tools:
            problems.append(
                ("features.use", "`tools`: this model's chat template does not take tools")
            )
    if "image" in features.use:
        if "chat" not in chosen:
            problems.append(("features.use", "`image` needs the chat endpoint in `endpoints`"))
        if shape.endpoints and not shape.multimodal:
            problems.append(
                ("features.use", "`image`: this model takes no images (it is text-only)")
            )
    if "lora" in features.use:
        if not shape.lora_enabled:
            problems.append(("features.use", "`lora` needs an engine started with --enable-lora"))
        missing = [a for a in features.lora if a not in shape.lora]
        if shape.lora_enabled and missing:
            problems.append(
                ("features.lora", f"no such adapter (--lora-modules): {', '.join(missing)}")
            )
    return problems


def for_engine(profile: Profile, shape: EngineShape) -> Profile:
    """The profile resolved against a started (or configured) engine: its endpoints, its
    `auto` buckets, every bucket and feature checked against the engine's limits."""
    problems: Problems = []
    chosen = _endpoints_for(profile, shape, problems)
    chat = any(endpoints.SPECS[name].templated for name in chosen)
    buckets = list(profile.buckets)
    if profile.auto is not None:
        known = {b.name for b in buckets}
        buckets += [b for b in auto_buckets(profile.auto, shape, chat) if b.name not in known]
    problems += _too_long(buckets, chosen, shape)
    problems += _feature_problems(profile.features, chosen, shape)
    problems += _prefill_problems(profile.prefill, shape, chosen[0])
    if problems:
        raise ProfileError("the profile does not fit this engine", problems=problems)
    features = profile.features
    if shape.lora_enabled and "prompt_logprobs" in features.use:
        # vLLM 0.32 computes prompt logprobs with the sampler's LoRA mapping: with --enable-lora
        # such a request kills the engine (vllm-project/vllm#16668, open), a user's as well
        logger.warning(
            "not warming prompt_logprobs: with --enable-lora a request for them kills vLLM "
            "0.32's engine (vllm-project/vllm#16668); users' such requests would too"
        )
        use = [name for name in features.use if name != "prompt_logprobs"]
        features = features.model_copy(update={"use": use})
    if (
        shape.multimodal
        and features.auto_image
        and "image" not in features.use
        and "chat" in chosen
    ):
        features = features.model_copy(update={"use": [*features.use, "image"]})
    rule = profile.convergence
    streams = True in profile.stream and any(endpoints.SPECS[n].streamable for n in chosen)
    if rule.metric != "e2e" and not streams:
        # Nothing streams (a pooling model): there is no first token or decode to time.
        rule = rule.model_copy(update={"metric": "e2e"})
    # A shallow copy on purpose: the prompts (and their texts read from file) are shared.
    return profile.model_copy(
        update={
            "endpoints": chosen,
            "features": features,
            "buckets": sorted(buckets, key=lambda b: -b.priority),
            "convergence": rule,
        }
    )
