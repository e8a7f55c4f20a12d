"""`llmwarm bench` against the paced fake OpenAI server of tests/fakes.py, on a real socket."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llmwarm import bench
from llmwarm.errors import Unreachable
from llmwarm.model import corpus
from llmwarm.model.profile import parse_profile
from llmwarm.warmup import measure
from tests.conftest import answering, invoke
from tests.fakes import Pace, _unary

PROBE = parse_profile(
    {
        "buckets": [{"prompt_tokens": 8, "concurrency": 2, "max_tokens": 3}],
        "stream": [True],
        "endpoints": ["chat"],
        "features": {"use": ["greedy", "logprobs", "grammar"]},
    }
)


async def test_first_against_steady_per_kind_and_refusals_reported(
    fake_url: str, pace: Pace
) -> None:
    # the first batch of each kind is slow (30 ms a token), later ones fast
    pace.gap = lambda calls: 0.03 if calls < 2 or 6 <= calls < 8 else 0.005
    async with measure.session(fake_url) as client:
        report = await bench.run(client, PROBE, "tiny", repeats=2, url=fake_url)
    greedy, logprobs, grammar = report.kinds
    assert (greedy.kind, logprobs.kind, grammar.kind) == (
        "chat-stream", "chat-stream+logprobs", "chat-stream+grammar",
    )  # fmt: skip
    for kind in (greedy, logprobs):
        # the first batch's median: its three tokens took 30 ms each at least (a sleep is
        # never shorter than asked); the ratio is it over the repeats' median
        assert kind.first_s is not None and kind.first_s >= 3 * 0.03
        assert kind.steady_s is not None and kind.steady_s >= 3 * 0.005
        assert kind.ratio == pytest.approx(kind.first_s / kind.steady_s)
    assert grammar.ratio is None and grammar.error is not None
    assert "HTTP 400" in grammar.error and "grammars are not supported" in grammar.error
    assert greedy.ratio is not None and logprobs.ratio is not None
    assert report.worst_ratio == max(greedy.ratio, logprobs.ratio)
    data = json.loads(report.model_dump_json())
    assert data["geomean_ratio"] == pytest.approx((greedy.ratio * logprobs.ratio) ** 0.5)


async def test_repeats_send_the_first_prompts_again_with_a_salt_of_their_own() -> None:
    # Same prompts, so a constrained output is as long every time; a salt per batch, so no
    # repeat is served from the prefix cache the first one filled.
    sent: list[dict[str, object]] = []

    async def server(request: Request) -> Response:
        sent.append(json.loads(await request.body()))
        usage = {"prompt_tokens": 8, "completion_tokens": 3}
        return JSONResponse(_unary(request.url.path, 3, usage))

    probe = PROBE.model_copy(update={"stream": [False]})
    async with answering(server) as c:
        report = await bench.run(c, probe, "tiny", repeats=2, url="http://x")
    assert [k.kind for k in report.kinds] == ["chat", "chat+logprobs", "chat+grammar"]
    assert len(sent) == 3 * 3 * 2  # kinds x (first + 2 repeats) x concurrency
    for kind in range(3):
        batches = [sent[i : i + 2] for i in range(kind * 6, kind * 6 + 6, 2)]
        # (the requests of a batch go out at once, in no set order)
        prompts = [sorted(json.dumps(body["messages"]) for body in batch) for batch in batches]
        assert prompts[0] == prompts[1] == prompts[2]
        assert len(set(prompts[0])) == 2  # the requests of one batch: prompts of their own
        salts = [{body["cache_salt"] for body in batch} for batch in batches]
        assert salts == [{"llmwarm-bench-1"}, {"llmwarm-bench-2"}, {"llmwarm-bench-3"}]


async def test_model_name_from_the_server(fake_url: str) -> None:
    def models(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": [{"id": "served-name"}]})

    async with httpx.AsyncClient(transport=httpx.MockTransport(models), base_url="http://x") as c:
        assert await bench.served_model(c) == "served-name"

    def down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"status": "loading"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(down), base_url="http://x") as c:
        assert await bench.served_model(c) is None
    # a server that answers but lists no model (the paced fake has no /v1/models)
    with pytest.raises(Unreachable) as info:
        await bench.probe(fake_url, profile=PROBE, repeats=1)
    assert info.value.problems[0][0] == "--model"


@pytest.mark.parametrize("model", [[], ["--model", "tiny"]])
def test_cli_against_a_server_that_is_not_there(tmp_path: Path, model: list[str]) -> None:
    # with or without --model: exit 7 (listed in --help), nothing written, no "refused" table
    out_file = tmp_path / "b.json"
    code, out = invoke("bench", "http://127.0.0.1:9", *model, "--json", str(out_file))
    assert code == 7 and "cannot reach http://127.0.0.1:9" in out, out
    assert "• URL: ConnectError" in out and "Traceback" not in out and "refused" not in out
    assert not out_file.exists()


def test_without_a_tokenizer_endpoint_lengths_are_approximate() -> None:
    # nothing listens on port 9: no /tokenize to ask (vLLM's is tested end to end)
    tokenizer = bench.tokenizer_for("http://127.0.0.1:9", "tiny", {})
    assert isinstance(tokenizer, corpus.WordTokenizer)


async def test_each_prompt_form_is_crossed_with_every_bucket() -> None:
    sent: list[tuple[str, object]] = []

    async def server(request: Request) -> Response:
        body = json.loads(await request.body())
        sent.append((request.url.path, body.get("prompt")))
        usage = {"prompt_tokens": 8, "completion_tokens": 3}
        return JSONResponse(_unary(request.url.path, 3, usage))

    probe = parse_profile(
        {
            "buckets": [
                {"prompt_tokens": 8, "concurrency": 1, "max_tokens": 3},
                {"prompt_tokens": 40, "concurrency": 2, "max_tokens": 3},
            ],
            "stream": [False],
            "endpoints": ["completions", "chat"],
            "features": {"use": ["greedy"]},
            "convergence": {"metric": "e2e"},
        }
    )
    forms = bench.prompt_forms("token_ids,prompt_batch")
    async with answering(server) as c:
        report = await bench.run(c, probe, "tiny", repeats=1, url="http://x", forms=forms)
    assert [(k.bucket, k.kind) for k in report.kinds] == [
        (bucket, kind)
        for bucket in ("p8-c1-o3", "p40-c2-o3")
        for kind in ("completions", "chat", "completions+token_ids", "completions+prompt_batch")
    ]
    assert all(k.error is None and k.ratio is not None for k in report.kinds)
    prompts = [p for path, p in sent if path == "/v1/completions"]
    ids = [p for p in prompts if isinstance(p, list) and isinstance(p[0], int)]
    batches = [p for p in prompts if isinstance(p, list) and isinstance(p[0], str)]
    # the first and one repeat of each: 1 + 2 requests (the buckets' concurrency), twice
    assert sorted(map(len, ids)) == [8, 8, 40, 40, 40, 40]  # WordTokenizer: a word a token
    assert len(batches) == 6 and all(len(b) == 4 for b in batches)


async def test_the_client_warms_itself_on_a_server_of_its_own_first() -> None:
    warm = await bench.warm_client(requests=3)
    assert warm.requests == 3 and warm.first_ms > 0 and warm.last_ms > 0


def test_probe_reports_its_client_warm_up_in_the_table(fake_url: str) -> None:
    report = bench.BenchReport(
        url=fake_url, model="tiny", repeats=1, exact_lengths=True, kinds=[],
        client_warm=bench.ClientWarm(requests=6, first_ms=3.2, last_ms=1.1),
    )  # fmt: skip
    caption = str(bench.table(report).caption)
    assert "client warmed first on a throw-away local server" in caption
    assert "first 3.2 ms, last 1.1 ms" in caption


@pytest.mark.parametrize("forms", ["bogus", "token_ids,chat", ""])
def test_bad_forms_exit_2_naming_the_flag(forms: str) -> None:
    code, out = invoke("bench", "http://127.0.0.1:9", "--forms", forms)
    assert code == 2 and "--forms" in out and "Traceback" not in out, out
