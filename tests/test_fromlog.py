from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmwarm.errors import ProfileError
from llmwarm.model.profile import parse_profile
from llmwarm.traffic.fromlog import build, parse

RECEIVED = (
    "(APIServer pid=1) INFO 11-28 20:07:51 [request_logger.py:66] Received request {rid}: "
    "params: SamplingParams(n={n}, presence_penalty=0.0, frequency_penalty=0.0, "
    "repetition_penalty=1.0, temperature={t}, watermarking=None, top_p=1.0, top_k=0, "
    "min_p=0.0, seed=None, stop=[], stop_token_ids=[], bad_words=[], "
    "thinking_token_budget=None, include_stop_str_in_output=False, ignore_eos=False, "
    "max_tokens={max_tokens}, min_tokens=0, logprobs={logprobs}, prompt_logprobs=None, "
    "skip_special_tokens=True, spaces_between_special_tokens=True, "
    "structured_outputs={so}, extra_args=None), lora_request: None."
)
DETAILS = (
    "(APIServer pid=1) DEBUG 11-28 20:07:51 [request_logger.py:56] Request {rid} details: "
    "prompt: 'x', prompt_token_ids: [{ids}], prompt_embeds shape: None."
)


def _received(rid: str, **kw: object) -> str:
    values = {"n": 1, "t": 0.0, "max_tokens": 16, "logprobs": None, "so": None, **kw}
    return RECEIVED.format(rid=rid, **values)


def test_vllm_log_lines_merge_per_request() -> None:
    so = "StructuredOutputsParams(json=None, regex='[a-z]+', choice=None, grammar=None)"
    lines = [
        _received("a", n=2, t=0.7, max_tokens=64, so=so),
        DETAILS.format(rid="a", ids=", ".join(["7"] * 300)),
        _received("b", logprobs=5),
    ]
    requests, skipped = parse(lines)
    assert skipped == 0
    a, b = requests
    assert a.prompt_tokens == 300 and a.max_tokens == 64
    assert a.features == {"sampling", "n", "regex"}
    assert b.prompt_tokens is None and b.features == {"logprobs"}


def test_openai_bodies() -> None:
    bodies = [
        {"prompt": "x" * 400, "max_tokens": 10, "stop": ["\n"]},
        {"messages": [{"role": "user", "content": "y" * 40}], "max_tokens": 300,
         "stream": True, "response_format": {"type": "json_schema", "json_schema": {}}},
        {"prompt": [1, 2, 3], "max_tokens": 5, "prompt_logprobs": 1},
        {"messages": [{"role": "user", "content": "z"}], "tools": [{"type": "function"}]},
        {"prompt": ["a" * 40, "b" * 40], "max_tokens": 4},
        {"prompt": [[1, 2], [3, 4, 5]], "max_tokens": 4},
    ]  # fmt: skip
    requests, skipped = parse([json.dumps(b) for b in bodies] + ["{not json"])
    assert skipped == 1
    assert [(r.endpoint, r.stream, r.prompt_tokens, r.max_tokens) for r in requests] == [
        ("completions", False, 100, 10),
        ("chat", True, 10, 300),
        ("completions", False, 3, 5),
        ("chat", False, 1, None),
        ("completions", False, 21, 4),  # the prompts' texts together
        ("completions", False, 5, 4),  # the prompts' token IDs together
    ]
    assert [r.features for r in requests] == [
        {"stop"}, {"json_schema"}, {"token_ids", "prompt_logprobs"}, {"tools"},
        {"prompt_batch"}, {"token_ids", "prompt_batch"},
    ]  # fmt: skip


def test_build_covers_the_asked_share_and_loads() -> None:
    # 90 short requests, 9 medium, 1 long: 99 % is covered by the first two buckets
    lines = (
        [json.dumps({"prompt": "a" * 40, "max_tokens": 16})] * 90
        + [json.dumps({"prompt": "b" * 800, "max_tokens": 100, "logprobs": 2})] * 9
        + [json.dumps({"prompt": "c" * 16000, "max_tokens": 16})]
    )
    data, comment = build(lines, 0.99, "traffic.jsonl")
    assert data["buckets"] == [
        {"prompt_tokens": 16, "concurrency": 1, "max_tokens": 16},
        {"prompt_tokens": 256, "concurrency": 1, "max_tokens": 128},
    ]
    assert data["features"] == {"use": ["greedy", "logprobs"]}
    assert data["endpoints"] == ["completions"]
    assert data["convergence"] == {"metric": "e2e"}  # nothing streamed: no TPOT to converge on
    assert "100 requests" in comment and "buckets cover 99.0%" in comment
    assert "logprobs 9%" in comment
    parse_profile(data)
    everything, _ = build(lines, 1.0, "traffic.jsonl")
    assert len(everything["buckets"]) == 3


def test_concurrency_from_timestamps() -> None:
    lines = [json.dumps({"prompt": "a", "max_tokens": 8, "timestamp": 10.0 + i / 10})
             for i in range(5)]  # fmt: skip
    data, _ = build(lines, 1.0, "t")
    assert data["buckets"] == [{"prompt_tokens": 16, "concurrency": 8, "max_tokens": 16}]


def test_nothing_usable() -> None:
    with pytest.raises(ProfileError) as info:
        build(["hello", "world"], 0.99, "junk.log")
    assert "2 lines, none an OpenAI request body" in info.value.problems[0][1]


def test_cli_writes_a_profile_that_checks(tmp_path: Path) -> None:
    from tests.conftest import invoke

    log = tmp_path / "t.log"
    log.write_text("\n".join([_received("a", t=0.9), DETAILS.format(rid="a", ids="1, 2")]))
    out = tmp_path / "p.yaml"
    code, text = invoke("profile", "from-log", str(log), "--out", str(out))
    assert code == 0, text
    assert "features seen: sampling 100%" in text
    assert invoke("profile", "check", str(out))[0] == 0


def test_every_api_is_recognised_by_path_body_or_log_id() -> None:
    bodies = [
        {"path": "/v1/messages", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9},
        {"model": "m", "system": "be brief", "messages": [{"role": "user", "content": "a"}],
         "max_tokens": 8},
        {"input": "x" * 40, "max_output_tokens": 20, "stream": True},
        {"input": "embed me"},
        {"url": "http://h:8000/pooling", "input": "pool me"},
        {"path": "/classify", "input": "classify me"},
        {"queries": "q", "documents": ["a", "b"]},
        {"query": "q", "documents": ["a", "b"]},
        {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
    ]  # fmt: skip
    lines = [json.dumps(b) for b in bodies]
    lines.append(_received("cmpl-abc-0"))
    lines.append(
        "(APIServer pid=1) INFO 11-28 20:07:52 [request_logger.py:66] Received request "
        "embd-9f-0: params: PoolingParams(task='embed', dimensions=None), lora_request: None."
    )
    requests, skipped = parse(lines)
    assert skipped == 0
    assert [r.endpoint for r in requests] == [
        "messages", "messages", "responses", "embeddings", "pooling", "classify", "score",
        "rerank", "chat", "completions", "embeddings",
    ]  # fmt: skip
    assert requests[2].max_tokens == 20 and requests[2].stream is True
    assert requests[8].features == {"image"}
    data, _ = build(lines, 1.0, "log")
    assert data["endpoints"] == [
        "completions", "chat", "responses", "messages", "embeddings", "pooling", "classify",
        "score", "rerank",
    ]  # fmt: skip
    assert "image" in data["features"]["use"]
    parse_profile(data)  # what it writes loads
