"""The warm-up runner against a fake OpenAI server (an ASGI app): measurement and errors."""

from __future__ import annotations

import pytest

from llmwarm.errors import WarmupError
from llmwarm.model.corpus import Corpus, WordTokenizer
from llmwarm.model.fit import EngineShape
from llmwarm.model.profile import Profile, parse_profile
from llmwarm.model.report import BucketResult, Outcome
from llmwarm.warmup import run as warmup
from llmwarm.warmup.progress import Progress
from tests.conftest import on_loopback
from tests.fakes import LocalClient, Pace, ScriptedClient, bucket, paced_app, report


def _profile(**fields: object) -> Profile:
    data: dict[str, object] = {
        "endpoints": ["completions", "chat"],
        "buckets": [{"prompt_tokens": 4, "concurrency": 2, "max_tokens": 5}],
        "convergence": {"window": 2, "spread": 0.5, "min_rounds": 2, "max_rounds": 4},
    }
    return parse_profile({**data, **fields})


async def _run(url: str, profile: Profile, on_round=lambda p: None) -> Outcome:  # type: ignore[no-untyped-def]
    async with LocalClient(url) as client:
        return await warmup.rounds(
            client, Corpus(profile, WordTokenizer(), "tiny"), on_round=on_round
        )


# The widest thresholds there are: any two rounds agree, whatever the host's moment, so a bucket
# converges at round 2 (what the rule decides on measured series is tests/test_convergence.py's,
# and the noisy case runs on `ScriptedClient` below).
AGREE = {"window": 2, "spread": 10, "improvement": 1, "min_rounds": 2, "max_rounds": 4}


async def test_run_measures_every_request_until_converged(fake_url: str) -> None:
    seen: list[Progress] = []
    # whole-request latency of a steady server: 5 tokens 10 ms apart, every round
    profile = _profile(convergence={**AGREE, "metric": "e2e"}, check=True)
    outcome = await _run(fake_url, profile, on_round=seen.append)
    [bucket] = outcome.buckets
    assert bucket.stop_reason == "converged" and bucket.converged_at == 2
    n = bucket.converged_at
    assert [r.round for r in bucket.rounds] == [1, 2]
    # a round: completions x concurrency 2, unary (e2e needs no stream), one batch; the sweep
    # after round 1 and the check after the last: completions streamed, chat streamed and not
    sizes = [len(r.samples) for r in bucket.rounds]
    assert sizes == [2, 2]
    assert outcome.requests == sum(sizes) + 6 + 6 and not outcome.budget_exhausted
    assert [(p.bucket_index, p.round, p.requests, p.bucket_done) for p in seen] == [
        (1, r, sum(sizes[:r]) + 6, r == n) for r in range(1, n + 1)
    ]
    assert bucket.sweep is not None and bucket.check is not None
    for rnd in bucket.rounds:
        assert [s.batch for s in rnd.samples] == sorted([*range(len(rnd.samples) // 2)] * 2)
    assert [len(v) for v in bucket.values("e2e")] == [s // 2 for s in sizes]  # one a batch
    assert len(bucket.sweep.samples) == len(bucket.check.samples) == 3 * 2
    for rnd in [*bucket.rounds, bucket.sweep, bucket.check]:
        for s in rnd.samples:
            # a sweep's requests stop at 2 tokens (`SWEEP_MAX_TOKENS`)
            assert s.output_tokens == (5 if rnd in bucket.rounds else 2)
            # the bucket's 4-token prompts (a token a word on the fake server); a sweep's
            # are at most 4 (`SWEEP_PROMPT_TOKENS`)
            assert s.prompt_tokens == 4
            if s.kind.stream:
                assert s.ttft_s is not None and s.tpot_s is not None
                assert s.tpot_s > 0 and s.ttft_s > 0
                # a token's time within its decode (of a batch, from when all its requests
                # had their first token: `measure.aligned`)
                assert s.tpot_s <= s.e2e_s - s.ttft_s
            else:
                assert s.ttft_s is None and s.tpot_s is None
            assert s.e2e_s > 0
    assert all({str(s.kind) for s in r.samples} == {"completions"} for r in bucket.rounds)
    assert {str(s.kind) for s in bucket.sweep.samples} == {
        "completions-stream", "chat", "chat-stream"
    }  # fmt: skip
    assert bucket.max_in_flight == 2


async def test_features_are_a_sweep_after_round_one_and_a_check_after_the_last(
    fake_url: str,
) -> None:
    profile = _profile(features={"use": ["greedy", "logprobs", "stop"]}, check=True)
    rule = profile.convergence
    outcome = await _run(fake_url, profile)
    [bucket] = outcome.buckets
    # every round repeats the first endpoint, plain, streamed (it carries the TPOT the rule
    # judges), whatever round it converged at
    assert all({str(s.kind) for s in r.samples} == {"completions-stream"} for r in bucket.rounds)
    assert bucket.sweep is not None and bucket.check is not None
    plain = {"completions-stream", "completions", "chat-stream", "chat"}
    once = (plain - {"completions-stream"}) | {
        f"{k}+{f}" for k in plain for f in ("logprobs", "stop")
    }
    assert {str(s.kind) for s in bucket.sweep.samples} == once
    assert {str(s.kind) for s in bucket.check.samples} == once
    assert len(bucket.sweep.samples) == len(bucket.check.samples) == 11 * 2  # x concurrency
    assert bucket.sweep.round == 1 and bucket.check.round == len(bucket.rounds)
    assert 2 <= len(bucket.rounds) <= rule.max_rounds
    # one batch a round (x 2); once the window (2 rounds) has failed with no noise measured
    # (one TPOT value a round), three
    sizes = [len(r.samples) for r in bucket.rounds]
    assert sizes[:2] == [2, 2] and sizes[2:] == [3 * 2] * (len(sizes) - 2)
    assert outcome.requests == sum(sizes) + 2 * 22


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_a_bucket_samples_three_batches_a_round_once_the_host_proves_noisy(
    concurrency: int,
) -> None:
    # a neighbour's bursts: every other batch runs 5x slower, its requests all alike
    client = ScriptedClient(lambda batch: 0.015 if batch % 2 else 0.003)
    profile = _profile(
        endpoints=["completions"],
        stream=[True],
        buckets=[{"prompt_tokens": 4, "concurrency": concurrency, "max_tokens": 5}],
        convergence={"window": 3, "spread": 0.15, "min_rounds": 3, "max_rounds": 12},
    )
    [bucket] = (await warmup.rounds(client, Corpus(profile, WordTokenizer(), "tiny"))).buckets
    batches = [sorted({s.batch for s in r.samples}) for r in bucket.rounds]
    # one batch a round while the fixed spread decides: its requests are one moment, so
    # rounds 1-3 measure no noise and their medians (3, 15, 3 ms) fail the 15 % spread ...
    assert batches[:3] == [[0], [0], [0]]
    # ... then three a round (15, 3, 15 ms), whose spread is the host's noise: the window's
    # medians (15, 3, 15 ms) lie within what that noise explains, and no drift shows
    assert batches[3:] == [[0, 1, 2]]
    assert bucket.converged_at == 4 and all(
        len(r.samples) % concurrency == 0 for r in bucket.rounds
    )
    assert bucket.noise is not None and bucket.noise > 0.15


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_a_bucket_whose_window_agrees_sends_one_batch_a_round(
    fake_url: str, concurrency: int
) -> None:
    # the widest thresholds there are: any two rounds agree, whatever the host's moment
    # (a CI host's load decides nothing here; the noisy case is the test above)
    rule = {"window": 2, "spread": 10, "improvement": 1, "min_rounds": 2, "max_rounds": 4}
    profile = _profile(
        endpoints=["completions"],
        stream=[True],
        buckets=[{"prompt_tokens": 4, "concurrency": concurrency, "max_tokens": 5}],
        convergence=rule,
    )
    [bucket] = (await _run(fake_url, profile)).buckets
    assert bucket.converged and len(bucket.rounds) == 2
    assert [sorted({s.batch for s in r.samples}) for r in bucket.rounds] == [[0], [0]]
    assert all(len(r.samples) == concurrency for r in bucket.rounds)


async def test_a_later_bucket_sweeps_only_what_no_earlier_one_sent(fake_url: str) -> None:
    profile = _profile(
        convergence=AGREE,
        buckets=[
            {"prompt_tokens": 4, "concurrency": 1, "max_tokens": 5, "name": "f"},
            {"prompt_tokens": 4, "concurrency": 1, "max_tokens": 5, "name": "plain"},
        ],
        features={"use": ["greedy", "logprobs"], "buckets": ["f"]},
    )
    outcome = await _run(fake_url, profile)
    featured, plain = outcome.buckets
    # no check unless the profile asks: it warms nothing the sweep did not
    assert featured.sweep is not None and featured.check is None
    assert {str(s.kind) for s in featured.sweep.samples} == {
        "completions", "chat-stream", "chat", "completions-stream+logprobs",
        "completions+logprobs", "chat-stream+logprobs", "chat+logprobs",
    }  # fmt: skip
    # an endpoint's path is paid once, at any shape: the plain bucket has nothing new to
    # sweep, only its shape to warm (its rounds)
    assert plain.sweep is None and plain.check is None and plain.converged
    assert all({str(s.kind) for s in r.samples} == {"completions-stream"} for r in plain.rounds)


async def test_what_a_skipped_bucket_would_have_swept_a_later_one_sweeps(fake_url: str) -> None:
    rule = {"metric": "e2e", "window": 2, "spread": 10.0, "min_rounds": 2, "max_rounds": 2}
    profile = _profile(
        convergence=rule,
        buckets=[
            {"prompt_tokens": 4, "concurrency": 1, "max_tokens": 5, "name": "o", "optional": True},
            {"prompt_tokens": 8, "concurrency": 1, "max_tokens": 5, "name": "r"},
        ],
    )
    async with LocalClient(fake_url) as client:
        outcome = await warmup.rounds(
            client, Corpus(profile, WordTokenizer(), "t"), optional_seconds=0
        )
    skipped, ran = outcome.buckets
    assert skipped.stop_reason == "skipped" and skipped.sweep is None
    # the optional bucket sent nothing: the other endpoint and mode are the required one's
    assert ran.sweep is not None
    assert {str(s.kind) for s in ran.sweep.samples} == {"completions-stream", "chat", "chat-stream"}


async def test_rounds_after_the_second_send_its_prompts_again_only_to_measure_decode(
    fake_url: str,
) -> None:
    rule = {"metric": "tpot", "window": 3, "spread": 0.5, "min_rounds": 4, "max_rounds": 4}
    profile = _profile(endpoints=["completions"], stream=[True], convergence=rule)
    [bucket] = (await _run(fake_url, profile)).buckets
    assert [r.repeats for r in bucket.rounds] == [None, None, 2, 2]
    # the bucket's warm TTFT is round 2's, its warm TPOT the window's
    assert bucket.warm("ttft", 3) == bucket.rounds[1].ttft_median_s
    assert bucket.warm("tpot", 3) is not None
    e2e = {**rule, "metric": "e2e"}
    [bucket] = (await _run(fake_url, _profile(convergence=e2e))).buckets
    assert [r.repeats for r in bucket.rounds] == [None] * 4


async def test_a_server_that_keeps_slowing_down_stops_at_max_rounds() -> None:
    # triples every batch (completions, unary, x concurrency 2; one endpoint and mode, so no
    # sweep between rounds), against the fixed spread alone (allow_noise false)
    client = ScriptedClient(lambda batch: 0.005 * 3**batch)
    rule = {"metric": "e2e", "window": 2, "spread": 0.5, "min_rounds": 2, "max_rounds": 3,
            "allow_noise": False}  # fmt: skip
    profile = _profile(endpoints=["completions"], stream=[False], convergence=rule)
    outcome = await warmup.rounds(client, Corpus(profile, WordTokenizer(), "tiny"))
    [bucket] = outcome.buckets
    assert bucket.converged_at is None and bucket.stop_reason == "max_rounds"
    assert len(bucket.rounds) == 3 and bucket.sweep is None
    # round 3: three batches, the window having failed with no noise measured
    assert [len(r.samples) for r in bucket.rounds] == [2, 2, 3 * 2]


async def test_budget_cuts_the_warmup_and_says_so(fake_url: str) -> None:
    two = [
        {"prompt_tokens": 4, "concurrency": 1, "max_tokens": 5},
        {"prompt_tokens": 8, "concurrency": 1, "max_tokens": 5},
    ]
    outcome = await _run(fake_url, _profile(buckets=two, budget={"max_seconds": 0.01}))
    first, second = outcome.buckets
    assert outcome.budget_exhausted
    assert len(first.rounds) == 1 and first.stop_reason == "budget"
    assert second.rounds == [] and second.stop_reason == "budget"


@pytest.mark.parametrize("stream", [True, False])
async def test_http_error_is_a_warmup_error_naming_the_request(fake_url: str, stream: bool) -> None:
    profile = _profile(stream=[stream], convergence={"metric": "e2e"})
    async with LocalClient(fake_url) as client:
        with pytest.raises(WarmupError) as info:
            await warmup.rounds(client, Corpus(profile, WordTokenizer(), "broken"))
    assert "bucket p4-c2-o5, round 1" in info.value.message
    assert "HTTP 404" in info.value.problems[0][1]
    assert "no such model" in info.value.problems[0][1]


async def test_connection_failure_is_a_warmup_error() -> None:
    async with LocalClient("http://127.0.0.1:9") as client:
        with pytest.raises(WarmupError) as info:
            await warmup.rounds(client, Corpus(_profile(), WordTokenizer(), "tiny"))
    assert "ClientConnectorError" in info.value.problems[0][1]


async def test_kv_fill_prefills_the_asked_share_of_blocks(fake_url: str) -> None:
    profile = _profile(kv_fill={"share": 0.5, "prompt_tokens": 7, "concurrency": 3})
    # the fake reports 7 prompt tokens a request; 20 blocks of 4 tokens: 10 blocks = 40 tokens
    shape = EngineShape(
        max_model_len=64, max_num_seqs=2, max_num_batched_tokens=64, kv_blocks=20, block_size=4
    )
    seen: list[tuple[int, int]] = []
    async with LocalClient(fake_url) as client:
        result = await warmup.fill_kv(
            client, Corpus(profile, WordTokenizer(), "tiny"), shape,
            on_batch=lambda done, target: seen.append((done, target)),
        )  # fmt: skip
    assert result is not None
    assert result.target_blocks == 10 and result.blocks == 20
    # batches of min(concurrency, max_num_seqs) = 2 requests, 14 tokens each, until >= 40
    assert result.requests == 6 and result.tokens_prefilled == 42
    assert result.blocks_reached == 10
    assert seen == [(3, 10), (7, 10), (10, 10)]


async def test_kv_fill_trims_its_last_batch_to_the_blocks_still_needed(fake_url: str) -> None:
    # 40 tokens wanted, 7 a request, 8 at once: 6 requests (42 tokens), not a batch of 8 (56)
    profile = _profile(kv_fill={"share": 0.5, "prompt_tokens": 7, "concurrency": 8})
    shape = EngineShape(
        max_model_len=64, max_num_seqs=8, max_num_batched_tokens=64, kv_blocks=20, block_size=4
    )
    async with LocalClient(fake_url) as client:
        result = await warmup.fill_kv(client, Corpus(profile, WordTokenizer(), "tiny"), shape)
    assert result is not None
    assert result.requests == 6 and result.tokens_prefilled == 42


async def test_no_kv_fill_without_the_section_or_block_count(fake_url: str) -> None:
    shape = EngineShape(max_model_len=64, max_num_seqs=2, max_num_batched_tokens=64)
    async with LocalClient(fake_url) as client:
        assert await warmup.fill_kv(client, Corpus(_profile(), WordTokenizer(), "m"), shape) is None
        with_fill = _profile(kv_fill={"share": 0.5})
        assert await warmup.fill_kv(client, Corpus(with_fill, WordTokenizer(), "m"), shape) is None


async def test_the_engines_running_count_is_read_around_each_round_only(fake_url: str) -> None:
    # a stand-in for vLLM's scheduler stats: each read gives the peak since the last read
    reads = iter([None, 2, None, 1, None, 2, None, 2, None, 2])
    taken: list[int | None] = []

    def running() -> int | None:
        taken.append(value := next(reads, None))
        return value

    rule = {"metric": "e2e", "window": 2, "spread": 10.0, "min_rounds": 2, "max_rounds": 2}
    async with LocalClient(fake_url) as client:
        outcome = await warmup.rounds(
            client, Corpus(_profile(convergence=rule), WordTokenizer(), "tiny"), running=running
        )
    [bucket] = outcome.buckets
    assert len(taken) == 4  # before and after each of its 2 rounds; never around the sweep
    assert bucket.max_running == 2


async def test_no_running_count_when_the_engine_reports_none(fake_url: str) -> None:
    [bucket] = (await _run(fake_url, _profile())).buckets
    assert bucket.max_running is None


async def test_optional_buckets_run_after_within_their_time_and_are_skipped_beyond(
    fake_url: str,
) -> None:
    rule = {"metric": "e2e", "window": 2, "spread": 10.0, "min_rounds": 2, "max_rounds": 2}
    profile = _profile(
        convergence=rule,
        buckets=[
            {"prompt_tokens": 4, "concurrency": 1, "max_tokens": 5},
            {"prompt_tokens": 8, "concurrency": 2, "max_tokens": 5, "optional": True},
            {"prompt_tokens": 16, "concurrency": 1, "max_tokens": 5, "optional": True},
        ],
    )
    async with LocalClient(fake_url) as client:
        none = await warmup.rounds(
            client, Corpus(profile, WordTokenizer(), "t"), optional_seconds=0
        )
        left = await warmup.rounds(
            client, Corpus(profile, WordTokenizer(), "t"), optional_seconds=0.06
        )
        some = await warmup.rounds(
            client, Corpus(profile, WordTokenizer(), "t"), optional_seconds=None
        )
    # no time for them: the required bucket warmed (its 2 rounds), the optional ones skipped
    assert [b.stop_reason for b in none.buckets][1:] == ["skipped", "skipped"]
    assert [len(b.rounds) for b in none.buckets] == [2, 0, 0] and not none.budget_exhausted
    assert none.buckets[0].required and not any(b.required for b in none.buckets[1:])
    # the time bounds the whole warm-up: required rounds that used it up leave none (2
    # requests one after another, 5 tokens 10 ms apart, are more than the 0.06 s)
    required = left.buckets[0]
    assert sum(s.e2e_s for r in required.rounds for s in r.samples) > 0.06
    assert [b.stop_reason for b in left.buckets][1:] == ["skipped", "skipped"]
    # no limit: all warmed, round after round (converged or not, on a loaded host)
    assert [len(b.rounds) for b in some.buckets] == [2, 2, 2]
    assert all(b.stop_reason in ("converged", "max_rounds") for b in some.buckets)


def test_an_optional_bucket_cut_for_time_leaves_the_warm_up_converged() -> None:
    required, optional = bucket(), bucket().model_copy(
        update={"name": "auto-p64-c8-o16", "optional": True, "converged_at": None,
                "stop_reason": "budget"}
    )  # fmt: skip
    assert report(required, optional).converged and report(required, optional).unconverged == []
    ran_out = optional.model_copy(update={"stop_reason": "max_rounds"})  # reached, never settled
    assert report(required, ran_out).unconverged == ["auto-p64-c8-o16"]


async def _ranked_run(ranks: list[int | None], pinned: bool) -> tuple[Outcome, list[str]]:
    """Rounds over data-parallel `ranks` against the paced fake server; the rank header of
    every request it got, in order (`-`: none)."""
    seen: list[str] = []
    server = paced_app(Pace())

    async def recording(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "http":
            seen.append(dict(scope["headers"]).get(b"x-data-parallel-rank", b"-").decode())
        await server(scope, receive, send)

    async with on_loopback(recording) as url, LocalClient(url) as client:
        requests = Corpus(_profile(convergence=AGREE), WordTokenizer(), "tiny")
        return await warmup.rounds(client, requests, ranks=ranks, pinned=pinned), seen


def _sent(result: BucketResult) -> int:
    done = [*result.rounds, *([result.sweep] if result.sweep else [])]
    return sum(len(r.samples) for r in [*done, *([result.check] if result.check else [])])


async def test_data_parallel_ranks_are_warmed_one_after_another_each_request_pinned() -> None:
    outcome, seen = await _ranked_run([0, 1], pinned=True)
    first, second = outcome.buckets
    assert (first.rank, second.rank) == (0, 1)
    assert (first.key, second.key) == ("p4-c2-o5@rank0", "p4-c2-o5@rank1")
    assert first.converged and second.converged
    # every request of rank 0's rounds, sweep and check, then every one of rank 1's
    assert seen == ["0"] * _sent(first) + ["1"] * _sent(second)
    assert outcome.requests == len(seen)


async def test_a_server_of_one_rank_warms_it_without_pinning() -> None:
    # external load balancing: the server fronts its own rank only; vLLM would reject a
    # rank it does not front, so nothing is pinned, and the results carry the rank
    outcome, seen = await _ranked_run([3], pinned=False)
    [only] = outcome.buckets
    assert only.rank == 3 and only.key == "p4-c2-o5@rank3" and only.converged
    assert seen == ["-"] * _sent(only)


async def test_without_data_parallelism_no_rank_anywhere() -> None:
    outcome, seen = await _ranked_run([None], pinned=False)
    [only] = outcome.buckets
    assert only.rank is None and only.key == "p4-c2-o5"
    assert set(seen) == {"-"}
