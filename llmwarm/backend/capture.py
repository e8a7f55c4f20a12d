"""CUDA-graph capture sizes chosen from a profile (`--capture-sizes-from-profile`; GPU).

vLLM's capture sizes count *tokens* in a step, for decode graphs and for mixed-prefill
(piecewise) graphs alike; a step runs on the smallest captured size at least as large (padded)
or, past the largest, without a graph (unpadded: torch.compile's graph for any size, compiled
at start). vLLM's default grid stops at min(2 x `max_num_seqs` x (1 + speculative tokens), 512)
tokens.

Graphs cost at every start: capture time per graph, and graph-pool memory, taken from the KV
cache, that grows with the largest captured step (vLLM measures it at start,
`vllm/v1/worker/gpu/cudagraph_utils.py` `profile_cudagraph_memory`: the largest graphs set the
pool, each further graph adds little). A graph pays where a step's kernel launches weigh: decode
steps and small mixed ones; a long prefill is compute-bound, and padding it up to a graph costs
more than the launches it saves. So `plan` stays under a *ceiling*: vLLM's own largest default
size, raised to the widest decode step the profile (and the learn file) runs (at most
`max_num_seqs` x (1 + speculative tokens), and at most `DECODE_REACH`: the pool grows at most
2x over vLLM's default's); warmed steps above it run without a graph, unpadded, as in vLLM's
default. With `FULL_DECODE_ONLY` graphs (no graph for a mixed step) only decode steps count,
and no size is planned above the widest decode step the engine runs (`max_num_seqs` x query).
Under the ceiling, at most
`MAX_SIZES` sizes (vLLM's own default count at its 512-token ceiling):

  1. the ceiling itself, so no step below it runs without a graph;
  2. the steps themselves, as many as fit: where there are more, the one whose steps would pay
     the least extra padding at the next size up goes first, by how often each step occurs
     (a bucket's steps once, the learn file's by their share of its requests);
  3. in the room left, vLLM's own grid points where they save the most padding between the
     sizes already chosen, for the steps between two classes.

The plan reports what it traded: its padding for a step of any size up to the ceiling beside
vLLM's default's, the warmed steps' own, the largest size beside vLLM's (the graph pool), and the
warmed steps left without a graph.

With speculative decoding every size is a multiple of the decode query length
(1 + speculative tokens): vLLM 0.32 dispatches a uniform decode batch only to such a size.
Pure: no vLLM (a config-level test holds `vllm_default` to vLLM's own logic).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from llmwarm.model.profile import Bucket
from llmwarm.model.report import CaptureSizes

MAX_SIZES = 51  # vLLM's default grid at its default 512-token ceiling: 1, 2, 4, 8..248, 256..512
_DEFAULT_CEILING = 512  # tokens; 1024 on data-centre Blackwell
# The widest decode step given a graph: vLLM's own largest default ceiling on any GPU (1024
# tokens, data-centre Blackwell). A wider step is compute-bound, its launches a small share.
DECODE_REACH = 1024


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


@dataclass
class Steps:
    """The steps, in tokens, a profile (and a learn file) runs, by how often each occurs."""

    weights: dict[int, float] = field(default_factory=dict)
    widest_decode: int = 1  # the largest decode step among them (tokens)
    decode_limit: int | None = None  # the widest the engine runs: max_num_seqs x query


def steps(
    buckets: Iterable[Bucket],
    max_num_batched_tokens: int,
    spec_tokens: int = 0,
    learned: Mapping[tuple[int, int], int] | None = None,
    *,
    max_num_seqs: int | None = None,
    decode_only: bool = False,
) -> Steps:
    """The steps, in tokens, that the buckets (and the learn file's (prompt, concurrency)
    classes, by request count) run, with how often each occurs: a decode step of
    `concurrency` (at most `max_num_seqs`) x (1 + speculative tokens), and, unless only decode
    steps take graphs (`decode_only`), one prompt's prefill and the whole batch's; each at most
    `max_num_batched_tokens` (a step never holds more)."""
    query = 1 + spec_tokens
    found = Steps()
    if max_num_seqs is not None:
        found.decode_limit = min(max_num_seqs * query, max_num_batched_tokens)

    def add(prompt: int, concurrency: int, weight: float) -> None:
        running = min(concurrency, max_num_seqs or concurrency)  # the scheduler's limit
        decode = min(running * query, max_num_batched_tokens)
        found.widest_decode = max(found.widest_decode, decode)
        for n in (decode,) if decode_only else (decode, prompt, running * prompt):
            step = min(_up(n, query), max_num_batched_tokens)
            found.weights[step] = found.weights.get(step, 0.0) + weight

    rows = list(buckets)
    for bucket in rows:
        add(bucket.prompt_tokens, bucket.concurrency, 1.0)
    total = sum((learned or {}).values())
    for (prompt, concurrency), requests in (learned or {}).items():
        add(prompt, concurrency, max(1, len(rows)) * requests / total)  # as much as the profile
    return found


def ceiling(
    found: Steps, default: Sequence[int], decode_only: bool = False, spec_tokens: int = 0
) -> int:
    """The largest size worth a graph (see the module docstring): the widest decode step, up
    to `DECODE_REACH` (or vLLM's own default's largest, if larger), and at least vLLM's
    default's largest; with decode-only graphs, the widest decode step the engine runs (a
    larger size would never be used), up to the same reach. A multiple of the decode query
    length."""
    query = 1 + spec_tokens
    vllms = default[-1] if default else 0
    reach = max(vllms, DECODE_REACH)
    if decode_only:
        top = min(found.decode_limit or found.widest_decode, reach)
    else:
        top = max(vllms, min(found.widest_decode, reach))
    return max(query, top // query * query)


def mean_padding(chosen: Sequence[int], weights: Mapping[int, float]) -> float:
    """The steps' mean padding, relative, weighted by how often each occurs (a step above the
    largest size runs without a graph: no padding)."""
    total = sum(weights.values())
    paid = 0.0
    for step, weight in weights.items():
        size = next((s for s in chosen if s >= step), step)
        paid += weight * (size - step) / step
    return paid / total if total else 0.0


def any_step_padding(chosen: Sequence[int], top: int, query: int = 1) -> float:
    """The mean relative padding of a step of each size from `query` to `top` tokens (multiples
    of `query`), each counted once: traffic between a profile's classes may run any of them."""
    return mean_padding(chosen, dict.fromkeys(range(query, top + 1, query), 1.0))


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
    found: Steps,
    default: Sequence[int],
    most: int = MAX_SIZES,
    spec_tokens: int = 0,
    decode_only: bool = False,
) -> CaptureSizes:
    """At most `most` capture sizes, under the ceiling, for the steps `found` (see the module
    docstring); `default` is what vLLM would capture instead."""
    query = 1 + spec_tokens
    top = ceiling(found, default, decode_only, spec_tokens)
    weights = {s: w for s, w in found.weights.items() if s <= top}
    ordered = sorted(weights)
    # per_token[k]: what one more token of padding costs the steps ordered[:k], together
    per_token = [0.0, *itertools.accumulate(weights[s] / s for s in ordered)]
    chosen = sorted({*ordered, top})
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
        sizes=chosen,
        ceiling=top,
        default_count=len(default),
        default_largest=default[-1] if default else 0,
        padding=round(any_step_padding(chosen, top, query), 4),
        default_padding=round(any_step_padding(default, top, query), 4) if default else None,
        warmed_padding=round(mean_padding(chosen, weights), 4),
        uncaptured=sorted(s for s in found.weights if s > top),
    )
