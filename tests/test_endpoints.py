"""Each endpoint's request body, and its answers read as a client sees them (real socket)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llmwarm.errors import WarmupError
from llmwarm.model import corpus, endpoints
from llmwarm.model.corpus import WarmRequest, WordTokenizer
from llmwarm.model.kinds import Kind
from llmwarm.model.profile import Profile, parse_profile
from llmwarm.warmup import measure
from tests.conftest import Handler, answering


def _profile(*names: str) -> Profile:
    return parse_profile(
        {
            "endpoints": list(names),
            "buckets": [{"prompt_tokens": 6, "concurrency": 1, "max_tokens": 5, "documents": 3}],
        }
    )


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("completions", {"prompt", "max_tokens", "temperature", "ignore_eos"}),
        ("chat", {"messages", "max_tokens", "temperature", "ignore_eos"}),
        ("responses", {"input", "max_output_tokens", "store", "temperature", "ignore_eos"}),
        ("messages", {"messages", "max_tokens", "temperature"}),  # Anthropic: no ignore_eos
        ("embeddings", {"input"}),
        ("pooling", {"input"}),
        ("classify", {"input"}),
        ("score", {"queries", "documents"}),
        ("rerank", {"query", "documents"}),
    ],
)
def test_unary_bodies(name: str, fields: set[str]) -> None:
    profile = _profile(name)
    (kind,) = [k for k in corpus.kinds(profile, profile.buckets[0]) if not k.stream]
    (req,) = (
        corpus.Corpus(profile, WordTokenizer(), "m").batch(profile.buckets[0], kind, 1).requests
    )
    assert set(req.body) == {"model", *fields}
    assert req.path == endpoints.SPECS[name].path
    if name == "responses":
        assert req.body["store"] is False  # vLLM would keep every warm-up response
    if name in ("score", "rerank"):
        assert len(req.body["documents"]) == 3  # the bucket's `documents`


def test_pooling_endpoints_never_stream() -> None:
    profile = _profile("embeddings", "chat")
    names = [str(k) for k in corpus.kinds(profile, profile.buckets[0])]
    assert names == ["embeddings", "chat-stream", "chat"]


@pytest.mark.parametrize("name", list(endpoints.SPECS))
async def test_each_api_is_timed_from_its_own_answers(fake_url: str, name: str) -> None:
    profile = _profile(name)
    async with measure.session(fake_url) as client:
        for kind in corpus.kinds(profile, profile.buckets[0]):
            batch = corpus.Corpus(profile, WordTokenizer(), "m").batch(profile.buckets[0], kind, 1)
            (sample,) = await measure.measure_all(client, batch.requests)
            # the bucket's 6-token prompt (a token a word on the fake server)
            assert sample.prompt_tokens == 6 and sample.e2e_s > 0
            if endpoints.SPECS[name].generates:
                assert sample.output_tokens == 5
            else:
                assert sample.output_tokens is None
            if kind.stream:  # TTFT and TPOT from the API's own token events
                assert sample.ttft_s is not None and sample.ttft_s > 0
                assert sample.tpot_s is not None and sample.tpot_s > 0


def test_stream_errors_in_each_form() -> None:
    assert endpoints.failed({"error": {"message": "x"}}) == {"message": "x"}
    assert endpoints.failed({"type": "error", "error": {"type": "overloaded"}}) is not None
    assert endpoints.failed({"type": "response.failed", "response": {"id": "r"}}) is not None
    assert endpoints.failed({"type": "response.output_text.delta", "delta": "x"}) is None


async def test_a_stream_that_sends_all_text_in_one_event_has_no_tpot() -> None:
    # vLLM may coalesce tokens into one event (seen on the Messages API): one text event
    # tells the first token's time, but no decode time.
    events = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 9, "output_tokens": 0}}},
        {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "x" * 8}},
        {"type": "message_delta", "usage": {"output_tokens": 8}},
    ]
    body = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)

    async def server(request: Request) -> Response:
        return Response(body.encode(), media_type="text/event-stream")

    req = WarmRequest(bucket="b", round=1, kind=Kind.parse("messages-stream"), body={})
    async with answering(server) as c:
        sample = await measure.measure(c, req)
    assert sample.ttft_s is not None and sample.ttft_s > 0
    assert sample.tpot_s is None
    assert (sample.prompt_tokens, sample.output_tokens) == (9, 8)


def _sse_server(events: list[dict[str, Any]]) -> Handler:
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"

    async def server(request: Request) -> Response:
        return Response(body.encode(), media_type="text/event-stream")

    return server


USAGE = {"prompt_tokens": 9, "completion_tokens": 1}


@pytest.mark.parametrize(
    ("name", "events"),
    [
        # vLLM sends a completions chunk for every token, its text empty for a special token
        ("completions", [{"choices": [{"text": "", "finish_reason": "stop"}]},
                         {"choices": [], "usage": USAGE}]),
        # chat's role chunk comes with the first token, whatever its text
        ("chat", [{"choices": [{"delta": {"role": "assistant", "content": ""}}]},
                  {"choices": [{"delta": {"content": ""}, "finish_reason": "stop"}]},
                  {"choices": [], "usage": USAGE}]),
        # the Messages API's message_start rides on chat's first chunk
        ("messages", [{"type": "message_start", "message": {"usage": {"input_tokens": 9}}},
                      {"type": "message_delta", "usage": {"output_tokens": 1}},
                      {"type": "message_stop"}]),
    ],
)  # fmt: skip
async def test_an_output_with_no_text_still_has_its_first_token_timed(
    name: str, events: list[dict[str, Any]]
) -> None:
    # CI saw it: a random model's Messages stream that ended at once (no ignore_eos there)
    req = WarmRequest(bucket="b", round=1, kind=Kind.parse(f"{name}-stream"), body={})
    async with answering(_sse_server(events)) as c:
        sample = await measure.measure(c, req)
    assert sample.ttft_s is not None and 0 < sample.ttft_s <= sample.e2e_s
    assert sample.tpot_s is None  # one token: no decode time
    assert (sample.prompt_tokens, sample.output_tokens) == (9, 1)


async def test_a_responses_stream_with_no_text_shows_no_first_token() -> None:
    # vLLM's Responses stream sends nothing for a token with no text: its first token is unseen
    events = [
        {"type": "response.created", "response": {"id": "r"}},
        {"type": "response.completed",
         "response": {"id": "r", "usage": {"input_tokens": 9, "output_tokens": 1}}},
    ]  # fmt: skip
    req = WarmRequest(bucket="b", round=1, kind=Kind.parse("responses-stream"), body={})
    async with answering(_sse_server(events)) as c:
        sample = await measure.measure(c, req)
    assert sample.ttft_s is None and sample.e2e_s > 0
    assert (sample.prompt_tokens, sample.output_tokens) == (9, 1)


@pytest.mark.parametrize(
    ("stream", "content", "said"),
    [
        (False, b"<html>502 Bad Gateway</html>", "the answer is not JSON"),
        (False, b"[1, 2]", "the answer is not a JSON object"),
        (True, b"data: {not json\n\n", "a stream event is not JSON"),
    ],
)
async def test_an_answer_that_is_not_json_is_a_warm_up_failure_naming_it(
    stream: bool, content: bytes, said: str
) -> None:
    # a proxy's HTML error page, a server that is not vLLM: a failure report, not a traceback
    async def server(request: Request) -> Response:
        return Response(content)

    req = WarmRequest(bucket="b", round=1, kind=Kind("completions", stream), body={})
    async with answering(server) as c:
        with pytest.raises(WarmupError) as info:
            await measure.measure(c, req)
    [(where, what)] = info.value.problems
    assert where == "bucket b" and what.startswith(said)


COMPLETION = {"choices": [{"text": "x"}], "usage": {"prompt_tokens": 9, "completion_tokens": 1}}


@pytest.mark.parametrize("status", [500, 503])
async def test_a_failure_vllm_asks_to_retry_is_sent_once_more(status: int) -> None:
    # vLLM answers a request-level internal error (e.g. its multimodal cache drifted between
    # frontend and engine: seen in CI on the vision model) with 500/503, to be sent again
    answers = [JSONResponse({"error": {"message": "Internal server error"}}, status),
               JSONResponse(COMPLETION)]  # fmt: skip
    sent: list[Request] = []

    async def server(request: Request) -> Response:
        sent.append(request)
        return answers.pop(0)

    req = WarmRequest(bucket="b", round=1, kind=Kind("completions"), body={})
    async with answering(server) as c:
        sample = await measure.measure(c, req)
    assert len(sent) == 2 and (sample.prompt_tokens, sample.output_tokens) == (9, 1)


@pytest.mark.parametrize(("status", "tries"), [(500, 2), (400, 1)])
async def test_twice_is_a_failure_and_a_client_error_is_never_retried(
    status: int, tries: int
) -> None:
    sent: list[Request] = []

    async def server(request: Request) -> Response:
        sent.append(request)
        return JSONResponse({"error": {"message": "no"}}, status)

    req = WarmRequest(bucket="b", round=1, kind=Kind("completions"), body={})
    async with answering(server) as c:
        with pytest.raises(WarmupError, match="warm-up request failed"):
            await measure.measure(c, req)
    assert len(sent) == tries
