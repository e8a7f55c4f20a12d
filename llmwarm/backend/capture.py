"""CUDA-graph capture sizes chosen from a profile (`--capture-sizes-from-profile`; GPU).

vLLM's capture sizes count *tokens* in a step, for decode graphs and for mixed-prefill
(piecewise) graphs alike; a step runs on the smallest captured size at least as large (padded)
or, past the largest, without a graph. vLLM's default grid stops at min(2 x `max_num_seqs` x
(1 + speculative tokens), 512) tokens, so a profile's long prefills and wide batches run eager.

Every size is a graph captured at each start (minutes and GiBs of graph memory on a large
model: the cost llmwarm exists to remove), so `plan` gives at most `MAX_SIZES`, vLLM's own
default count at its 512-token ceiling:

  1. the largest step the profile (and the learn file) warms, so none of them runs eager;
  2. the steps themselves, as many as fit: where there are more, the one whose steps would pay
     the least extra padding at the next size up goes first, by how often each step occurs
     (a bucket's steps once, the learn file's by their share of its requests);
  3. in the room left, vLLM's own grid points where they save the most padding between the
     sizes already chosen, for the steps between two classes.

With speculative decoding every size is a multiple of the decode query length
(1 + speculative tokens): vLLM 0.32 dispatches a uniform decode batch only to such a size.
Pure: no vLLM (a config-level test holds `vllm_default` to vLLM's own logic).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

from llmwarm.model.profile import Bucket
from llmwarm.model.report import CaptureSizes

MAX_SIZES = 51  # vLLM's default grid at its default 512-token ceiling: 1, 2, 4, 8..248, 256..512
_DEFAULT_CEILING = 512  # tokens; 1024 on data-centre Blackwell


def _grid(top: int) -> list[int]:
    """vLLM's default grid up to `top`: 1, 2, 4, multiples of 8 to 256, of 16 beyond."""
    grid = [n for n in (1, 2, 4) if n <= top]
    return grid + list(range(8, min(top + 1, 256), 8)) + list(range(256, top + 1, 16))


def vllm_default(max_num_seqs: int, max_num_batched_tokens: int, spec_tokens: int = 0) -> list[int]:
    """The sizes vLLM 0.32 captures when none are given (`VllmConfig._set_cudagraph_sizes` on
    a GPU other than data-centre Blackwell, no dynamic speculative decoding): its grid up to
    min(2 x max_num_seqs x query, 512, max_num_batched_tokens), that budget itself if it fits,
    and the uniform decode sizes (request counts x query)."""
    query = 1 + spec_tokens
    ceiling = min(max_num_seqs * query * 2, _DEFAULT_CEILING)
    if query > 1:
        widest = min(max_num_seqs, _DEFAULT_CEILING)
        decode = [n * query for n in {*_grid(widest), widest} if n * query <= ceiling]
    else:
        decode = [max_num_seqs] if max_num_seqs <= ceiling else []
    top = min(max_num_batched_tokens, ceiling)
    sizes = {*_grid(top), *(s for s in decode if s <= max_num_batched_tokens)}
    if max_num_batched_tokens <= top:
        sizes.add(max_num_batched_tokens)
    return sorted(sizes)


def _up(n: int, query: int) -> int:
    return -(-n // query) * query


def steps(
    buckets: Iterable[Bucket],
    max_num_batched_tokens: int,
    spec_tokens: int = 0,
    learned: Mapping[tuple[int, int], int] | None = None,
) -> dict[int, float]:
    """The steps, in tokens, that the buckets (and the learn file's (prompt, concurrency)
    classes, by request count) run, with how often each occurs: a decode step of
    `concurrency` x (1 + speculative tokens), one prompt's prefill and the whole batch's, each
    at most `max_num_batched_tokens` (a step never holds more)."""
    query = 1 + spec_tokens
    weights: dict[int, float] = {}

    def add(prompt: int, concurrency: int, weight: float) -> None:
        for n in (concurrency * query, prompt, concurrency * prompt):
            step = min(_up(n, query), max_num_batched_tokens)
            weights[step] = weights.get(step, 0.0) + weight

    rows = list(buckets)
    for bucket in rows:
        add(bucket.prompt_tokens, bucket.concurrency, 1.0)
    total = sum((learned or {}).values())
    for (prompt, concurrency), requests in (learned or {}).items():
        add(prompt, concurrency, max(1, len(rows)) * requests / total)  # as much as the profile
    return weights


def _padding(chosen: Sequence[int], weights: Mapping[int, float]) -> float:
    """The steps' mean padding, relative, weighted by how often each occurs."""
    total = sum(weights.values())
    paid = 0.0
    for step, weight in weights.items():
        size = next(s for s in chosen if s >= step)
        paid += weight * (size - step) / step
    return paid / total if total else 0.0


def _drop_cost(
    i: int, chosen: Sequence[int], ordered: Sequence[int], per_token: Sequence[float]
) -> float:
    """The padding the steps padded to `chosen[i]` (those above the size below it) would pay
    more at the size above, without it."""
    below = bisect.bisect_right(ordered, chosen[i - 1]) if i else 0
    at = bisect.bisect_right(ordered, chosen[i])
    return (per_token[at] - per_token[below]) * (chosen[i + 1] - chosen[i])


def _fill_gain(c: int, chosen: Sequence[int]) -> float:
    """The padding a size `c` saves every token count between its neighbours in `chosen`
    ((above - c) less each, relative to itself)."""
    at = bisect.bisect_left(chosen, c)  # chosen[at] > c: c is not chosen, and below the top
    below = chosen[at - 1] if at else 0
    return (chosen[at] - c) * (_harmonic(c) - _harmonic(below))


def _harmonic(n: int) -> float:
    """1 + 1/2 + ... + 1/n, near enough."""
    return 0.0 if n < 1 else math.log(n) + 0.5772156649 + 1 / (2 * n)


def plan(
    weights: Mapping[int, float], default_count: int, most: int = MAX_SIZES, spec_tokens: int = 0
) -> CaptureSizes:
    """At most `most` capture sizes for steps of these weights (see the module docstring)."""
    query = 1 + spec_tokens
    ordered = sorted(weights)
    top = ordered[-1]
    # per_token[k]: what one more token of padding costs the steps ordered[:k], together
    per_token = [0.0, *itertools.accumulate(weights[s] / s for s in ordered)]
    chosen = list(ordered)
    while len(chosen) > most:  # the size whose steps lose least at the next one up goes
        chosen.pop(
            min(range(len(chosen) - 1), key=lambda i: _drop_cost(i, chosen, ordered, per_token))
        )
    grid = [g for g in _grid(top) if g % query == 0 and g not in chosen]
    while len(chosen) < most and grid:  # vLLM's grid where it saves the most padding
        best = max(grid, key=lambda c: _fill_gain(c, chosen))
        grid.remove(best)
        chosen = sorted([*chosen, best])
    return CaptureSizes(
        sizes=chosen, default_count=default_count, padding=round(_padding(chosen, weights), 4)
    )
