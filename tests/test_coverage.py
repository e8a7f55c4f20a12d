"""Live requests in the warm-up's terms: their shape, whether the warm-up covered them, and
what a miss cost."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmwarm.model import corpus
from llmwarm.model.features import Feature
from llmwarm.model.kinds import Kind
from llmwarm.model.profile import Profile, parse_profile
from llmwarm.model.report import PrefillResult
from llmwarm.traffic.coverage import MAX_MISS_KINDS, MAX_SHAPES, Coverage, Shape, Warmed, classify
from llmwarm.traffic.skeleton import Skeleton
from tests.fakes import bucket, report
from tests.fakes import shape as _shape


def _read(raw: bytes) -> object:
    """A body as the gate reads it (`Skeleton`), in small chunks."""
    skeleton = Skeleton()
    for i in range(0, len(raw), 7):
        skeleton.feed(raw[i : i + 7])
    return skeleton.parse()


def _body(**fields: object) -> object:
    return _read(json.dumps({"model": "m", **fields}).encode())


USAGE = b'{"id":"x","choices":[],"usage":{"prompt_tokens":300,"completion_tokens":20}}'


def test_a_request_is_described_in_the_warm_ups_own_terms() -> None:
    body = _body(messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=20,
                 logprobs=True, top_logprobs=2, temperature=0.7)  # fmt: skip
    shape = classify("chat", body, b"data: " + USAGE + b"\n\ndata: [DONE]\n\n", 3, frozenset({"m"}))
    assert shape == _shape("chat-stream+logprobs+sampling", 512, 4, 32)
    assert str(shape.kind) == "chat-stream+logprobs+sampling"
    assert list(map(str, shape.kind.singles())) == ["chat-stream+logprobs", "chat-stream+sampling"]
    assert shape.name == "chat-stream+logprobs+sampling p512-c4-o32"


def test_without_usage_the_prompt_length_is_estimated_from_its_text() -> None:
    body = _body(prompt="x" * 400, max_tokens=5)
    shape = classify("completions", body, b'{"choices":[]}', 1, frozenset({"m"}))
    assert shape is not None and shape.prompt_tokens == 128  # 400 chars at ~4 a token
    assert shape.kind == Kind("completions") and shape.kind.singles() == [Kind("completions")]


def test_another_model_name_is_an_adapter_and_pooling_has_no_output() -> None:
    lora = classify("completions", _body(model="sql", prompt="x"), USAGE, 1, frozenset({"m"}))
    assert lora is not None and lora.kind == Kind.parse("completions+lora:sql")
    embed = classify("embeddings", _body(input="x"), USAGE, 1, frozenset({"m"}))
    assert embed is not None and (embed.kind.stream, embed.max_tokens) == (False, 1)


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b""])
def test_a_body_that_is_not_a_json_object_is_not_classified(body: bytes) -> None:
    assert classify("chat", _read(body), b"", 1, frozenset()) is None


def test_a_5_mb_image_is_an_image_request_of_its_texts_length() -> None:
    image = "data:image/png;base64," + "A" * 5_000_000
    body = _body(
        messages=[{"role": "user", "content": [{"type": "text", "text": "x" * 1000},
                   {"type": "image_url", "image_url": {"url": image}}]}],
        max_tokens=16, stream=True,
    )  # fmt: skip
    shape = classify("chat", body, b"", 1, frozenset({"m"}))  # no usage: from the text
    assert shape is not None and shape.kind == Kind.parse("chat-stream+image")
    assert shape.prompt_tokens == 256  # 1,000 characters of text; the image is not text


def _warmed() -> Warmed:
    profile = parse_profile(
        {
            "endpoints": ["completions", "chat"],
            "buckets": [
                {"prompt_tokens": 16, "concurrency": 1, "max_tokens": 8},
                {"prompt_tokens": 200, "concurrency": 4, "max_tokens": 8},
            ],
            "features": {"use": ["greedy", "logprobs", "image"], "images": ["64x64"]},
        }
    )
    return Warmed.from_profile(profile)


def test_covered_means_every_kind_warmed_and_the_shape_within_the_warmed_range() -> None:
    warmed = _warmed()
    assert warmed.prompt_tokens == 200 and warmed.concurrency == 4
    plain = _shape("chat-stream", 256, 4, 16)  # 256: the class of the 200-token bucket
    assert warmed.misses(plain) == []
    assert warmed.misses(_shape("chat+logprobs", 16, 1, 16)) == []
    assert warmed.misses(_shape("chat+image", 16, 1, 16)) == []  # any size
    assert warmed.misses(_shape("chat-stream+logprobs+n", 512, 8, 16)) == [
        "kind chat-stream+n not warmed",
        "prompt class 512 above the warmed 200",
        "8 in flight above the warmed 4",
    ]
    assert warmed.misses(_shape("responses-stream", 16, 1, 16)) == [
        "kind responses-stream not warmed"
    ]


def test_the_warmed_kinds_of_a_report_are_those_it_sent() -> None:
    ran, cut = bucket(), bucket().model_copy(update={"prompt_tokens": 999, "rounds": []})
    warmed = Warmed.from_report(report(ran, cut))
    assert warmed.kinds == {Kind.parse("completions-stream"), Kind("completions")}
    # a bucket the budget cut before its first round warmed nothing
    assert (warmed.prompt_tokens, warmed.concurrency) == (ran.prompt_tokens, ran.concurrency)


def test_the_prefill_sweeps_longest_prompt_is_within_the_warmed_range() -> None:
    ran = bucket()  # prompt 4
    swept = report(ran).model_copy(
        update={"prefill": PrefillResult(token_counts=[16, 32, 1023], batched=4, requests=7,
                                         seconds=1.0)}
    )  # fmt: skip
    assert Warmed.from_report(report(ran)).prompt_tokens == 4
    warmed = Warmed.from_report(swept)
    assert warmed.prompt_tokens == 1023
    assert warmed.misses(_shape("completions", 1024, 1, 16)) == []
    assert warmed.misses(_shape("completions", 2048, 1, 16)) == [
        "prompt class 2048 above the warmed 1023"
    ]
    # a warm-up whose buckets sent nothing covers nothing, prefilled or not
    idle = swept.model_copy(update={"buckets": [ran.model_copy(update={"rounds": []})]})
    assert Warmed.from_report(idle).kinds == frozenset()
    assert Warmed.from_report(idle).prompt_tokens == 0


def test_data_parallel_ranks_count_as_one_server_warmed_where_every_rank_was() -> None:
    # rank 0 ran a wide bucket that rank 1's budget cut: a user's request may land on
    # either rank, so only what both were warmed at is covered
    wide = bucket().model_copy(update={"prompt_tokens": 512, "concurrency": 8})
    rank0 = [b.model_copy(update={"rank": 0}) for b in (bucket(), wide)]
    rank1 = [
        bucket().model_copy(update={"rank": 1}),
        wide.model_copy(update={"rank": 1, "rounds": [], "sweep": None, "check": None}),
    ]
    warmed = Warmed.from_report(report(*rank0, *rank1))
    assert (warmed.prompt_tokens, warmed.concurrency) == (4, 1)
    assert Warmed.from_report(report(*rank0)).prompt_tokens == 512
    # a rank that sent nothing at all: nothing is covered
    idle = bucket().model_copy(update={"rank": 2, "rounds": [], "sweep": None, "check": None})
    assert Warmed.from_report(report(*rank0, idle)).kinds == frozenset()


def test_a_miss_costs_its_first_request_over_the_median_of_its_later_ones() -> None:
    coverage = Coverage(warmed=_warmed())
    covered = _shape("chat-stream", 16, 1, 16)
    missed = _shape("chat-stream+n", 16, 1, 16)
    assert coverage.record(covered, 0.01) is True
    for latency in (0.9, 0.1, 0.3, 0.2):
        assert coverage.record(missed, latency) is False
    summary = coverage.summary()
    assert (summary["requests"], summary["covered"], summary["uncovered"]) == (5, 1, 4)
    assert summary["covered_share"] == 0.2
    [miss] = summary["uncovered_by_requests"]
    assert miss["kind"] == "chat-stream+n" and miss["shapes"] == ["p16-c1-o16"]
    assert miss["requests"] == 4
    assert miss["first_s"] == 0.9 and miss["later_median_s"] == 0.2
    assert miss["cold_miss_ratio"] == pytest.approx(4.5)
    assert summary["uncovered_by_cold_miss"] == [miss]
    assert coverage.all_shapes() == {covered: 1, missed: 4}


def test_a_kinds_misses_at_several_shapes_are_one_miss_with_every_reason() -> None:
    coverage = Coverage(warmed=_warmed())
    coverage.record(_shape("chat-stream+n", 16, 1, 16), 0.4)
    coverage.record(_shape("chat-stream+n", 1024, 1, 16), 0.2)
    [miss] = coverage.summary()["uncovered_by_requests"]
    assert miss["shapes"] == ["p1024-c1-o16", "p16-c1-o16"]
    assert miss["why"] == [
        "kind chat-stream+n not warmed",
        "prompt class 1024 above the warmed 200",
    ]
    assert miss["cold_miss_ratio"] == 2.0


def test_a_rewarm_that_covers_a_miss_drops_it() -> None:
    coverage = Coverage(warmed=_warmed())
    missed = _shape("chat-stream+n", 16, 1, 16)
    coverage.record(missed, 0.5)
    profile = parse_profile(
        {"endpoints": ["chat"], "buckets": [{"prompt_tokens": 16, "concurrency": 1,
         "max_tokens": 8}], "features": {"use": ["greedy", "n"]}}
    )  # fmt: skip
    coverage.warmed_more(Warmed.from_profile(profile))
    assert coverage.misses == {} and coverage.record(missed, 0.1) is True


def test_before_any_warm_up_nothing_is_covered() -> None:
    coverage = Coverage()
    assert coverage.record(_shape("chat", 16, 1, 16), 0.1) is False
    assert coverage.summary()["uncovered_by_requests"][0]["why"] == ["no warm-up yet"]


def test_in_flight_counts_up_to_what_the_engine_runs_at_once() -> None:
    coverage = Coverage(served=frozenset({"m"}), max_running=4)
    shape = coverage.classify("completions", _body(prompt="x"), USAGE, 100)
    assert shape is not None and shape.concurrency == 4


def test_a_live_kind_needs_the_corpus_kind_of_each_of_its_features() -> None:
    live = _shape("completions+stop", 16, 1, 16).kind
    [sent] = [k for k in corpus.kinds(_profile_with("stop"), _profile_with("stop").buckets[0])
              if k.feature.name == "stop" and not k.stream]  # fmt: skip
    assert live.singles() == [sent]


def _profile_with(feature: str) -> Profile:
    return parse_profile(
        {"endpoints": ["completions"], "features": {"use": [feature]},
         "buckets": [{"prompt_tokens": 16, "concurrency": 1, "max_tokens": 8}]}
    )  # fmt: skip


def test_a_narrower_warm_up_takes_nothing_away_from_what_is_warm() -> None:
    # The defect: a re-warm with the `minimal` profile became what was warm, so kinds the
    # start-up warm-up had made warm counted as misses.
    coverage = Coverage()
    logprobs, plain = Kind.parse("chat-stream+logprobs"), Kind("completions")
    coverage.warmed_more(Warmed.of([(512, 8, [logprobs, plain])]))
    coverage.warmed_more(Warmed.of([(16, 1, [plain])]))
    assert coverage.record(_shape("chat-stream+logprobs", 512, 8, 16), 0.1) is True
    assert coverage.warmed == Warmed(frozenset({logprobs, plain}), 512, 8)


def test_a_prompt_is_classified_by_its_form() -> None:
    served = frozenset({"m"})
    ids = classify("completions", _body(prompt=list(range(300)), stream=True), USAGE, 1, served)
    assert ids is not None and str(ids.kind) == "completions-stream+token_ids"
    batch = classify("completions", _body(prompt=["a b", "c d"]), USAGE, 1, served)
    assert batch is not None and str(batch.kind) == "completions+prompt_batch"
    both = classify("completions", _body(prompt=[[1, 2], [3]]), USAGE, 1, served)
    assert both is not None and str(both.kind) == "completions+prompt_batch+token_ids"
    # covered only where the warm-up sent each form
    plain = Warmed(frozenset({Kind.parse("completions"), Kind.parse("completions-stream")}), 512, 4)
    assert plain.misses(ids) == ["kind completions-stream+token_ids not warmed"]
    forms = Warmed(plain.kinds | {Kind.parse("completions+prompt_batch"),
                                  Kind.parse("completions+token_ids")}, 512, 4)  # fmt: skip
    assert forms.misses(both) == [] and forms.misses(batch) == []


# --- requests vLLM accepts, classified as vLLM reads them ---------------------------------------

_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 5), st.floats(-1, 3, allow_nan=False),
    st.sampled_from(["", "0", "1", "2", " 3 ", "2.0", "0.7", "1e-1", "inf", "true", "no", "x"]),
)  # fmt: skip
_FIELDS = st.dictionaries(
    st.sampled_from([
        "stream", "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
        "frequency_penalty", "repetition_penalty", "max_tokens", "logprobs", "top_logprobs",
        "seed", "stop", "url", "path", "timestamp",
    ]),
    _SCALARS,
)  # fmt: skip
_MODELS = st.sampled_from(["tiny", "", "sql", None])


@settings(max_examples=300, deadline=None)
@given(
    fields=_FIELDS,
    model=_MODELS,
    chat=st.booleans(),
    extra=st.sampled_from([{}, {"url": "http://["}]),
)
def test_any_request_vllm_accepts_is_classified_as_vllm_reads_it(
    fields: dict[str, Any], model: str | None, chat: bool, extra: dict[str, Any]
) -> None:
    # The defect: "temperature": "0.7" or "n": "2" (vLLM coerces both), "model": "" or an
    # extra "url": "http://[" made the classifier raise, a traceback logged per request.
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.exceptions import VLLMValidationError

    body: dict[str, Any] = {**fields, **extra, **({} if model is None else {"model": model})}
    if chat:
        body["messages"] = [{"role": "user", "content": "what is warm"}]
    else:
        body["prompt"] = "what is warm"
    model_type = ChatCompletionRequest if chat else CompletionRequest
    try:
        request = model_type.model_validate(body)
    except (ValueError, TypeError, VLLMValidationError):
        return  # vLLM would answer 400: nothing to classify
    shape = Coverage(served=frozenset({"tiny"})).classify(
        "chat" if chat else "completions", body, b"", 1
    )
    assert shape is not None
    names = {f.name for f in shape.kind.features}
    assert shape.kind.stream is bool(request.stream)
    assert ("n" in names) is ((request.n or 1) > 1)
    penalties = (request.presence_penalty, request.frequency_penalty, request.repetition_penalty)
    assert ("penalties" in names) is any(penalties)


def test_users_decide_neither_the_label_values_nor_the_memory() -> None:
    # The defect: every uncovered kind became a label value on the unauthenticated /metrics,
    # and every distinct shape was kept forever (and walked on the loop for each learn write).
    import tracemalloc

    from prometheus_client import CollectorRegistry, generate_latest

    from llmwarm.serve.metrics import WarmupCollector
    from llmwarm.serve.state import RunState

    state = RunState(window=2)
    coverage = state.coverage
    coverage.served, coverage.max_model_len = frozenset({"tiny"}), 1024
    coverage.warmed_more(Warmed(frozenset({Kind("completions")}), 64, 1))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(20_000):  # 10,000 served adapters, two shapes each: all uncovered
        kind = Kind("chat", False, (Feature("lora", f"adapter-{i // 2}"),))
        shape = Shape(kind, 2 ** (4 + i % 2), 1, 16)
        assert coverage.record(shape, 0.2 if i % 2 == 0 else 0.1) is False
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(coverage.served_shapes) <= MAX_SHAPES
    assert coverage.untracked["shapes_full"] == 20_000 - MAX_SHAPES
    assert coverage.uncovered == 20_000  # every request counted, kept or not
    assert grown < 8 * 2**20, grown  # bytes: bounded whatever the traffic
    registry = CollectorRegistry()
    registry.register(WarmupCollector(state))
    series = [
        line for line in generate_latest(registry).decode().splitlines()
        if line.startswith("llmwarm_cold_miss_ratio{")
    ]  # fmt: skip
    assert len(series) == MAX_MISS_KINDS + 1 and 'kind="other"' in series[-1]
    assert len(coverage.summary()["uncovered_by_requests"]) == MAX_MISS_KINDS + 1


def test_a_prompt_class_is_at_most_what_the_engine_takes() -> None:
    coverage = Coverage(served=frozenset({"tiny"}), max_model_len=1024)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4}
    usage = b'{"usage": {"prompt_tokens": 999999999, "completion_tokens": 4}}'
    shape = coverage.classify("completions", body, usage, 1)
    assert shape is not None and shape.prompt_tokens == 1024
