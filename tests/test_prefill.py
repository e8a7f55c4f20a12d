"""The prefill sweep: which prompt token counts it sends (what fits the engine), and how."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from llmwarm.errors import ProfileError
from llmwarm.model.corpus import Corpus, WarmRequest, WordTokenizer
from llmwarm.model.fit import EngineShape, for_engine, prefill_counts
from llmwarm.model.profile import Prefill, parse_profile
from llmwarm.model.report import PrefillResult, Sample
from llmwarm.warmup import prefill
from tests.conftest import on_loopback
from tests.fakes import LocalClient, answer

SHAPE = EngineShape(max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=512)


def test_the_counts_double_to_a_steps_limit_then_the_longest_prompt() -> None:
    # completions: the prompt and its one output token within --max-model-len
    assert prefill_counts(Prefill(), SHAPE, "completions") == [16, 32, 64, 128, 256, 512, 1023]
    # chat: a template's tokens kept free too
    assert prefill_counts(Prefill(), SHAPE, "chat")[-1] == 1024 - 1 - 64
    # embeddings: no output token
    assert prefill_counts(Prefill(), SHAPE, "embeddings")[-1] == 1024
    # a step larger than the longest prompt: the longest prompt
    wide = EngineShape(max_model_len=300, max_num_seqs=8, max_num_batched_tokens=8192)
    assert prefill_counts(Prefill(min_tokens=64), wide, "completions") == [64, 128, 256, 299]


def test_on_gpu_every_captured_size_in_range_is_a_count_too() -> None:
    # vLLM pads a step to its captured CUDA graph: each size is a shape of its own
    gpu = EngineShape(
        max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=512,
        cudagraph_capture_sizes=[1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64],
    )  # fmt: skip
    assert prefill_counts(Prefill(max_tokens=100), gpu, "completions") == [
        16, 24, 32, 40, 48, 56, 64, 100,
    ]  # fmt: skip


@pytest.mark.parametrize("field", ["min_tokens", "max_tokens"])
def test_a_count_that_does_not_fit_is_an_error_naming_the_field(field: str) -> None:
    profile = parse_profile(
        {
            "endpoints": ["completions"],
            "buckets": [{"prompt_tokens": 8, "concurrency": 1, "max_tokens": 4}],
            "prefill": {field: 4000},
        }
    )
    with pytest.raises(ProfileError) as info:
        for_engine(profile, SHAPE)
    [(where, why)] = info.value.problems
    assert where == f"prefill.{field}" and "at most 1023" in why and "--max-model-len" in why


def test_max_tokens_below_min_tokens_is_refused_at_load() -> None:
    with pytest.raises(ProfileError) as info:
        parse_profile({"buckets": [], "prefill": {"min_tokens": 64, "max_tokens": 32}})
    assert info.value.problems[0][0] == "prefill"


class _Batches(LocalClient):
    """The local client, recording the prompt lengths (a word a token) of each batch it is
    asked to send at once (`measure_all` sends a batch's requests together: test_client.py)."""

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url)
        self.batches: list[list[int]] = []

    async def measure_all(self, requests: Sequence[WarmRequest]) -> list[Sample]:
        self.batches.append([len(r.body["prompt"].split()) for r in requests])
        return await super().measure_all(requests)


async def test_each_count_alone_then_shared_by_batched_requests_at_once() -> None:
    sent: list[dict[str, Any]] = []

    async def completions(request: Request) -> Response:
        body = await request.json()
        sent.append(body)
        return await answer(request.url.path, body, gap=0.0)

    profile = for_engine(
        parse_profile(
            {
                "endpoints": ["completions"],
                "buckets": [{"prompt_tokens": 8, "concurrency": 1, "max_tokens": 4}],
                "prefill": {"min_tokens": 16, "max_tokens": 128, "batched": 4},
            }
        ),
        SHAPE,
    )
    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    async with on_loopback(app) as url, _Batches(url) as client:
        result = await prefill.sweep(client, Corpus(profile, WordTokenizer(), "m", "s"), SHAPE, 60)
    assert result is not None
    assert result.token_counts == [16, 32, 64, 128] and result.batched == 4 and not result.cut
    # shortest first, each count alone then shared at once: 64 and 128 as four requests each
    # (16 and 32 would be shorter than min_tokens a request)
    assert client.batches == [[16], [32], [64], [16] * 4, [128], [32] * 4]
    assert result.requests == len(sent) == 12
    # the prefill's token and one decode step over it, salted, plain; no two prompts alike (no
    # prefix-cache hit)
    assert all(b["max_tokens"] == 2 and b["cache_salt"] == "s" for b in sent)
    assert not any(b.get("stream") for b in sent)
    assert len({b["prompt"] for b in sent}) == len(sent)


async def test_the_longest_prompt_gets_the_one_token_its_context_has_room_for() -> None:
    sent: list[dict[str, Any]] = []

    async def completions(request: Request) -> Response:
        body = await request.json()
        sent.append(body)
        return await answer(request.url.path, body, gap=0.0)

    profile = for_engine(
        parse_profile(
            {
                "endpoints": ["completions"],
                "buckets": [{"prompt_tokens": 8, "concurrency": 1, "max_tokens": 4}],
                "prefill": {"min_tokens": 512, "batched": 1, "max_share": None},
            }
        ),
        SHAPE,
    )
    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    async with on_loopback(app) as url, LocalClient(url) as client:
        result = await prefill.sweep(client, Corpus(profile, WordTokenizer(), "m", "s"), SHAPE, 60)
    assert result is not None and result.token_counts == [512, 1023]
    sizes = [(len(b["prompt"].split()), b["max_tokens"]) for b in sent]
    # 1023 tokens and one output token fill --max-model-len 1024: no room for a decode step
    assert sizes == [(512, 2), (1023, 1)]


async def test_no_sweep_without_the_section() -> None:
    profile = parse_profile({"buckets": [{"prompt_tokens": 8, "concurrency": 1, "max_tokens": 4}]})
    async with LocalClient("http://127.0.0.1:9") as client:  # nothing is sent
        assert await prefill.sweep(client, Corpus(profile, WordTokenizer(), "m"), SHAPE, 60) is None


@pytest.mark.parametrize(
    ("max_share", "sent", "cut"),
    [
        # a token a millisecond, a limit of 0.05 x 3 s: 16, then 32 (16 + 32 ms, as foreseen
        # from 16's ms a token), then 64 (foreseen 48 + 64 ms; it takes 128: alone and four at
        # once), and 128 is foreseen past the limit (176 + 256 ms); the first always runs
        (0.05, [16, 32, 64], [128, 256, 512, 1023]),
        # 0.03 x 3 s = 90 ms: 64 is foreseen to end at 112 ms
        (0.03, [16, 32], [64, 128, 256, 512, 1023]),
        (0.001, [16], [32, 64, 128, 256, 512, 1023]),
        (None, [16, 32, 64, 128, 256, 512, 1023], []),
    ],
)
async def test_the_sweep_climbs_until_it_has_taken_its_share_of_the_engines_start(
    monkeypatch: pytest.MonkeyPatch, max_share: float | None, sent: list[int], cut: list[int]
) -> None:
    clock = 0.0  # the sweep's clock: a prompt token costs the engine a millisecond
    monkeypatch.setattr(prefill, "perf_counter", lambda: clock)

    async def completions(request: Request) -> Response:
        nonlocal clock
        body = await request.json()
        clock += len(body["prompt"].split()) / 1000
        return await answer(request.url.path, body, gap=0.0)

    profile = for_engine(
        parse_profile(
            {
                "endpoints": ["completions"],
                "buckets": [{"prompt_tokens": 8, "concurrency": 1, "max_tokens": 4}],
                "prefill": {"max_share": max_share},
            }
        ),
        SHAPE,
    )
    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    async with on_loopback(app) as url, LocalClient(url) as client:
        result = await prefill.sweep(client, Corpus(profile, WordTokenizer(), "m"), SHAPE, 3.0)
    assert result is not None
    assert (result.token_counts, result.cut) == (sent, cut)
    assert result.seconds == pytest.approx(clock)


def test_data_parallel_ranks_sweeps_add_up_to_the_counts_every_rank_was_sent() -> None:
    a = PrefillResult(token_counts=[16, 32, 64], batched=4, cut=[128], requests=5, seconds=1.0)
    b = PrefillResult(token_counts=[16, 32], batched=4, cut=[64, 128], requests=3, seconds=2.0)
    both = PrefillResult.add(a, b)
    assert both is not None
    assert (both.token_counts, both.cut) == ([16, 32], [64, 128])
    assert (both.requests, both.seconds) == (8, 3.0)
    assert PrefillResult.add(None, b) is b
