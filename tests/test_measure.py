"""Measuring a batch: every request of it really in flight at once, whatever its size."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import aiohttp
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from llmwarm.model import corpus
from llmwarm.model.corpus import WordTokenizer
from llmwarm.model.profile import parse_profile
from llmwarm.warmup import measure
from tests.conftest import on_loopback
from tests.fakes import Clock, answer

WIDE = 150  # more than a client's default pool (100 connections in aiohttp and httpx)


@pytest.fixture
async def barrier_url() -> AsyncIterator[str]:
    """A server that answers none of the first WIDE requests until all WIDE have arrived: a
    batch finishes only if the client really had all of it in flight at once."""
    arrived = 0
    everyone = asyncio.Event()

    async def completions(request: Request) -> Response:
        nonlocal arrived
        body = await request.json()
        arrived += 1
        if arrived >= WIDE:
            everyone.set()
        await everyone.wait()
        return await answer(request.url.path, body, gap=0.0)

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    async with on_loopback(app) as url:
        yield url
        everyone.set()  # let whatever a capped client got in finish, so the server can stop


def _requests(stream: bool, endpoint: str = "completions") -> list[corpus.WarmRequest]:
    profile = parse_profile(
        {
            "endpoints": [endpoint],
            "stream": [stream],
            "buckets": [{"prompt_tokens": 4, "concurrency": WIDE, "max_tokens": 3}],
            "convergence": {"metric": "e2e"},
        }
    )
    [batch] = corpus.Corpus(profile, WordTokenizer(), "m").round_batches(profile.buckets[0], 1)
    return list(batch.requests)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_a_batch_wider_than_a_default_pool_is_all_in_flight_at_once(
    barrier_url: str, stream: bool
) -> None:
    async with measure.session(barrier_url) as client:
        # with a default pool the 101st request would wait for a connection forever
        samples = await asyncio.wait_for(measure.measure_all(client, _requests(stream)), 60)
    assert len(samples) == WIDE
    counts = sorted(s.in_flight for s in samples if s.in_flight is not None)
    # each request counted itself and those before it on the wire: 1, 2, ..., WIDE
    assert counts == list(range(1, WIDE + 1))


async def test_a_capped_pool_never_gets_the_batch_in_flight(barrier_url: str) -> None:
    capped = aiohttp.TCPConnector(limit=100)  # aiohttp's default
    async with aiohttp.ClientSession(base_url=barrier_url, connector=capped) as client:
        work = measure.measure_all(client, _requests(False))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(work, 3)


@pytest.mark.parametrize(
    ("extra", "sequences"),
    [({}, 1), ({"n": 2}, 2), ({"prompt": ["a b", "c d", "e f"]}, 3),
     ({"prompt": [[1, 2], [3, 4]], "n": 2}, 4)],
)  # fmt: skip
async def test_time_per_token_is_a_sequences_when_several_decode_side_by_side(
    extra: dict[str, object], sequences: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `sequences` sequences of 5 tokens each, a step of them every 20 ms (virtual time): 20 ms
    # a token each, where a count of every sequence's tokens together made it
    # 80/(5*sequences - 1) ms
    step, tokens = 0.02, 5
    clock = Clock()
    clock.install(monkeypatch)

    async def completions(request: Request) -> Response:
        async def events() -> AsyncIterator[bytes]:
            for i in range(tokens):
                for j in range(sequences):
                    await clock.at(0.01 + i * step)
                    yield b'data: {"choices": [{"index": %d, "text": "a"}]}\n\n' % j
            usage = b'{"prompt_tokens": 4, "completion_tokens": %d}' % (tokens * sequences)
            clock.ending()
            yield b'data: {"choices": [], "usage": ' + usage + b"}\n\ndata: [DONE]\n\n"

        await request.body()
        clock.arrived()
        return StreamingResponse(events(), media_type="text/event-stream")

    [request] = _requests(stream=True)[:1]
    request = dataclasses.replace(request, body={**request.body, **extra})
    assert request.sequences == sequences
    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    async with on_loopback(app) as url, measure.session(url) as session:
        [sample] = await measure.measure_all(session, [request])
    assert sample.output_tokens == tokens * sequences
    assert sample.ttft_s == pytest.approx(0.01)
    assert sample.tpot_s == pytest.approx(step)
    assert sample.e2e_s == pytest.approx(0.01 + (tokens - 1) * step)


def test_ticks_time_per_token_from_a_moment() -> None:
    # a first token, a 1 s stall (another request's prefill), then a token every 20 ms
    ticks = measure.Ticks([0.0, 1.0, 1.02, 1.04, 1.06], tokens=5)
    assert ticks.tpot() == pytest.approx(1.06 / 4)
    assert ticks.tpot(since=0.99) == pytest.approx(0.02)
    assert ticks.tpot(since=1.03) == pytest.approx(0.02)  # one gap left
    assert ticks.tpot(since=1.05) == pytest.approx(1.06 / 4)  # no gap after it: the whole
    # two tokens an event: a gap is two tokens' time
    assert measure.Ticks([0.0, 0.04, 0.08], tokens=5).tpot() == pytest.approx(0.02)
    assert measure.Ticks([0.0], tokens=5).tpot() is None  # all of it in one event
    assert measure.Ticks([0.0, 0.1], tokens=1).tpot() is None


async def test_a_chat_stream_decodes_from_its_first_text_not_its_role_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A chat stream opens with a role chunk (no text): its TTFT. Here the text comes a stall
    # later, then two tokens 20 ms apart (virtual time). The stall is no decode: counting the
    # role chunk as an event of the decode put a token's share on it (520 ms a token, not 20).
    stall, step = 0.5, 0.02
    clock = Clock()
    clock.install(monkeypatch)

    async def chat(request: Request) -> Response:
        await request.body()
        clock.arrived()

        async def events() -> AsyncIterator[bytes]:
            await clock.at(0.01)
            yield b'data: {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}\n\n'
            await clock.at(0.01 + stall)
            yield b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n'
            await clock.at(0.01 + stall + step)
            yield b'data: {"choices": [{"index": 0, "delta": {"content": "b"}}]}\n\n'
            usage = b'{"prompt_tokens": 4, "completion_tokens": 2}'
            clock.ending()
            yield b'data: {"choices": [], "usage": ' + usage + b"}\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    request = _requests(stream=True, endpoint="chat")[0]
    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    async with on_loopback(app) as url, measure.session(url) as session:
        sample = await measure.measure(session, request)
    # the first token came with the role chunk, the stall and the decode after it
    assert sample.ttft_s == pytest.approx(0.01)
    assert sample.tpot_s == pytest.approx(step)
    assert sample.e2e_s == pytest.approx(0.01 + stall + step)


async def test_a_batch_decodes_from_when_all_its_requests_had_their_first_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The engine's race: the first request's first token comes at once, the second's after its
    # 1 s prefill step, which the first waits through; then both decode a token every 20 ms
    # (virtual time). The first's time per token over all its tokens was a quarter second.
    prefill, step, tokens = 1.0, 0.02, 5
    clock = Clock()
    clock.install(monkeypatch)
    first_sent, second_started = asyncio.Event(), asyncio.Event()
    arrived = 0

    async def completions(request: Request) -> Response:
        nonlocal arrived
        await request.body()
        clock.arrived()
        arrived += 1
        mine = arrived

        async def events() -> AsyncIterator[bytes]:
            begin = clock.now  # (the third request, alone, after the batch)
            for i in range(tokens):
                if mine == 1 and i == 0:
                    await clock.at(0.001)
                    first_sent.set()
                elif mine == 2 and i == 0:
                    await first_sent.wait()
                    await clock.at(prefill)
                    second_started.set()
                elif mine <= 2:
                    await second_started.wait()
                    await clock.at(prefill + i * step)
                else:
                    await clock.at(begin + 0.001 + i * step)
                yield b'data: {"choices": [{"index": 0, "text": "a"}]}\n\n'
            usage = b'{"prompt_tokens": 4, "completion_tokens": %d}' % tokens
            clock.ending()
            yield b'data: {"choices": [], "usage": ' + usage + b"}\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    requests = _requests(stream=True)[:2]
    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    async with on_loopback(app) as url, measure.session(url) as session:
        first, second = await measure.measure_all(session, requests)
        alone = await measure.measure(session, requests[0])  # one request: nothing to align
    assert first.ttft_s == pytest.approx(0.001) and second.ttft_s == pytest.approx(prefill)
    # both: their decode side by side, not the other's prefill (a quarter second a token)
    assert first.tpot_s == pytest.approx(step) and second.tpot_s == pytest.approx(step)
    assert alone.tpot_s == pytest.approx(step)
