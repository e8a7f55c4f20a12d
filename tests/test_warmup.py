"""The warm-up runner against a fake OpenAI server (an ASGI app): measurement and errors."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmwarm import corpus, warmup
from llmwarm.errors import WarmupError
from llmwarm.profile import parse_profile
from tests.test_corpus import WordTokenizer

TOKEN_GAP = 0.01


async def _completions(request: Request) -> Response:
    body = await request.json()
    n = body["max_tokens"]
    usage = {"prompt_tokens": 7, "completion_tokens": n}
    if body.get("model") == "broken":
        return JSONResponse({"error": {"message": "no such model"}}, status_code=404)
    if not body.get("stream"):
        return JSONResponse({"choices": [{"text": "x" * n}], "usage": usage})

    async def events():  # type: ignore[no-untyped-def]
        chat = "messages" in body
        if chat:  # a role-only first chunk carries no token
            yield f"data: {json.dumps({'choices': [{'delta': {'role': 'assistant'}}]})}\n\n"
        for _ in range(n):
            await asyncio.sleep(TOKEN_GAP)
            choice = {"delta": {"content": "x"}} if chat else {"text": "x"}
            yield f"data: {json.dumps({'choices': [choice]})}\n\n"
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


FAKE = Starlette(
    routes=[
        Route("/v1/completions", _completions, methods=["POST"]),
        Route("/v1/chat/completions", _completions, methods=["POST"]),
    ]
)


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=FAKE), base_url="http://fake")


PROFILE = parse_profile(
    {"rounds": 2, "buckets": [{"prompt_tokens": 4, "concurrency": 2, "max_tokens": 5}]}
)


async def test_run_measures_every_request_per_bucket_and_round() -> None:
    progress: list[int] = []
    async with _client() as client:
        results = await warmup.run(
            client, corpus.plan(PROFILE, WordTokenizer(), "tiny"), on_progress=progress.append
        )
    assert [b.name for b in results] == ["p4-c2-o5"]
    bucket = results[0]
    assert [r.round for r in bucket.rounds] == [1, 2]
    assert progress == [2, 4, 6, 8, 10, 12, 14, 16]
    for rnd in bucket.rounds:
        assert len(rnd.samples) == 2 * 4
        for s in rnd.samples:
            assert s.output_tokens == 5 and s.prompt_tokens == 7
            if s.kind.endswith("-stream"):
                assert s.ttft_s is not None and s.tpot_s is not None
                # four gaps of TOKEN_GAP between the five tokens; never negative
                assert s.tpot_s > 0 and s.ttft_s > 0
                assert s.e2e_s >= s.ttft_s + 4 * s.tpot_s
            else:
                assert s.ttft_s is None and s.tpot_s is None
            assert s.e2e_s > 0
    kinds = sorted({s.kind for s in bucket.rounds[0].samples})
    assert kinds == ["chat", "chat-stream", "completions", "completions-stream"]


@pytest.mark.parametrize("stream", [True, False])
async def test_http_error_is_a_warmup_error_naming_the_request(stream: bool) -> None:
    profile = PROFILE.model_copy(update={"stream": [stream]})
    async with _client() as client:
        with pytest.raises(WarmupError) as info:
            await warmup.run(client, corpus.plan(profile, WordTokenizer(), "broken"))
    assert "bucket p4-c2-o5, round 1" in info.value.message
    assert "HTTP 404" in info.value.problems[0][1]
    assert "no such model" in info.value.problems[0][1]


async def test_connection_failure_is_a_warmup_error() -> None:
    async with httpx.AsyncClient(base_url="http://127.0.0.1:9") as client:
        with pytest.raises(WarmupError) as info:
            await warmup.run(client, corpus.plan(PROFILE, WordTokenizer(), "tiny"))
    assert "ConnectError" in info.value.problems[0][1]
