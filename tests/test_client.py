"""The warm-up's client in a process of its own, against the paced fake server."""

from __future__ import annotations

import asyncio

import psutil
import pytest

from llmwarm.errors import WarmupError
from llmwarm.model.corpus import Corpus, WarmRequest, WordTokenizer
from llmwarm.model.kinds import Kind
from llmwarm.model.profile import parse_profile
from llmwarm.warmup.client import ClientProcess
from tests.fakes import Pace

PROFILE = parse_profile(
    {"endpoints": ["completions", "chat"], "stream": [True, False],
     "buckets": [{"prompt_tokens": 8, "concurrency": 3, "max_tokens": 4}]}
)  # fmt: skip


def _batch(model: str = "m") -> list[WarmRequest]:
    """Three streamed requests and three unary ones, all at once."""
    requests = Corpus(PROFILE, WordTokenizer(), model)
    bucket = PROFILE.buckets[0]
    kinds = [Kind("completions", stream) for stream in (True, False)]
    return [r for kind in kinds for r in requests.batch(bucket, kind, 1).requests]


async def test_a_batch_is_measured_there_and_its_samples_come_back(
    fake_url: str, pace: Pace
) -> None:
    client = ClientProcess(fake_url, {})
    client.start()
    pace.hold_until(6)  # the server answers none before all six are in
    try:
        requests = _batch()
        samples = await client.measure_all(requests)
        assert [s.kind for s in samples] == [r.kind for r in requests]
        streamed = [s for s in samples if s.kind.stream]
        assert streamed and all(s.ttft_s and s.tpot_s for s in streamed)
        assert all(s.e2e_s > 0 and s.output_tokens == 4 for s in samples)
        assert max(s.in_flight or 0 for s in samples) == 6  # a batch is sent at once
    finally:
        client.close()


async def test_a_failed_request_is_the_same_warmup_error_here(fake_url: str) -> None:
    client = ClientProcess(fake_url, {})
    try:
        with pytest.raises(WarmupError) as info:
            await client.measure_all(_batch("broken"))
        assert "HTTP 404" in info.value.problems[0].message
        assert info.value.problems[0].where.startswith("bucket ")
        # the process serves on after a failure
        assert len(await client.measure_all(_batch())) == 6
    finally:
        client.close()


async def test_a_cancelled_batch_ends_the_process_and_the_next_call_starts_anew(
    fake_url: str, pace: Pace
) -> None:
    client = ClientProcess(fake_url, {})
    client.start()
    first = client._process
    try:
        pace.hold_until(7)  # the batch's six are held: under way until cancelled
        batch = asyncio.create_task(client.measure_all(_batch()))
        while pace.calls < 6:  # all of them reached the server
            await asyncio.sleep(0.01)
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch
        assert first is not None and not first.is_alive()
        pace.release()
        pace.gap = lambda calls: 0.001
        assert len(await client.measure_all(_batch())) == 6
        assert client._process is not first
    finally:
        client.close()
    assert not psutil.pid_exists(first.pid) or psutil.Process(first.pid).status() == "zombie"
