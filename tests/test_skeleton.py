"""A request body read as its chunks go by, all but its long strings
(`llmwarm.traffic.skeleton`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmwarm.traffic.skeleton import DENSE_AFTER, LONG, MAX_KEPT, Skeleton, text_length


@dataclass(frozen=True)
class Skipped:
    """A string skipped, of this many bytes of escaped text."""

    size: int


def _expected(value: Any) -> Any:
    """`value` with every string longer than `LONG` (in UTF-8 bytes) skipped."""
    if isinstance(value, str):
        size = len(json.dumps(value, ensure_ascii=False)[1:-1].encode())
        return value if size <= LONG else Skipped(size)
    if isinstance(value, list):
        return [_expected(v) for v in value]
    if isinstance(value, dict):
        return {_expected(k): _expected(v) for k, v in value.items()}
    return value


def _read(value: Any) -> Any:
    """A parsed skeleton with its placeholders read back (`text_length`)."""
    if isinstance(value, str):
        return value if text_length(value) == len(value) else Skipped(text_length(value))
    if isinstance(value, list):
        return [_read(v) for v in value]
    if isinstance(value, dict):
        return {_read(k): _read(v) for k, v in value.items()}
    return value


texts = st.one_of(
    st.text(max_size=20),
    st.text(alphabet='ab"\\\n/é😀', max_size=30),  # quotes, backslashes, escapes, non-ASCII
    st.builds(lambda n, c: c * n, st.integers(LONG - 5, LONG * 3), st.sampled_from('a"\\é')),
    # runs of backslashes longer than what a chunk's end is looked at for (64 bytes)
    st.lists(st.sampled_from(["\\" * 70, "\\" * 33, '"', "a", "\\"]), max_size=24).map("".join),
)
values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    body=st.dictionaries(texts, values, max_size=6),
    cuts=st.lists(st.one_of(st.integers(1, 50), st.integers(51, 400))),
)
def test_any_body_in_any_chunks_parses_to_itself_less_its_long_strings(
    body: dict[str, Any], cuts: list[int]
) -> None:
    raw = json.dumps(body, ensure_ascii=False).encode()
    skeleton = Skeleton()
    pos = 0
    for cut in cuts:  # the chunks a client's writes arrive in
        skeleton.feed(raw[pos : pos + cut])
        pos += cut
    skeleton.feed(raw[pos:])
    assert _read(skeleton.parse()) == _expected(body)


def test_a_skipped_strings_length_reads_back() -> None:
    skeleton = Skeleton()
    skeleton.feed(json.dumps({"prompt": "x" * 100_000, "n": 2}).encode())
    parsed = skeleton.parse()
    assert parsed["n"] == 2 and text_length(parsed["prompt"]) == 100_000
    assert text_length("short") == 5


def test_not_json_or_too_much_to_keep_is_none() -> None:
    for raw in (b"not json", b'{"open": "never closed', b"[1, 2"):
        skeleton = Skeleton()
        skeleton.feed(raw)
        assert skeleton.parse() is None
    huge = Skeleton()
    huge.feed(json.dumps({"prompt": list(range(MAX_KEPT // 4))}).encode())  # token ids
    assert huge.unread == "large" and huge.parse() is None


def _lines_run(chunks: list[bytes]) -> int:
    """Python lines `Skeleton` runs to read these chunks and parse them: its cost, counted as
    steps rather than timed (the same on any machine)."""
    here = Skeleton.feed.__code__.co_filename
    count = 0

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if frame.f_code.co_filename != here:
            return None
        if event == "line":
            count += 1
        return trace

    skeleton = Skeleton()
    sys.settrace(trace)
    try:
        for chunk in chunks:
            skeleton.feed(chunk)
        skeleton.parse()
    finally:
        sys.settrace(None)
    return count


HOSTILE = {
    # the review's: a prompt of escaped quotes never adds to the kept bytes
    "escaped quotes": {"prompt": '"' * 200_000},
    "backslashes": {"prompt": "\\" * 200_000},
    "quotes and backslashes": {"prompt": '\\"a' * 70_000},
    "a hundred thousand short strings": {"prompt": ["a"] * 100_000},
    "thirty thousand keys": {f"k{i}": "v" for i in range(30_000)},
    "long strings, just": {"prompt": ["b" * (LONG + 1)] * 700},
}


@pytest.mark.parametrize("body", list(HOSTILE.values()), ids=list(HOSTILE))
def test_a_hostile_body_costs_a_few_steps_a_chunk_not_a_step_a_byte(body: Any) -> None:
    # The defect: a Python step per escaped quote (400 KB of them: 58 ms on the serving loop,
    # against 1 ms for json.loads) or per string. Now: passes in C over each chunk, and a
    # Python step per long string only (at most one per LONG bytes).
    raw = json.dumps(body).encode()
    chunks = [raw[i : i + 65536] for i in range(0, len(raw), 65536)]
    skipped = sum(1 for v in body.values() for s in (v if isinstance(v, list) else [v])
                  if len(json.dumps(s)) - 2 > LONG)  # fmt: skip
    assert _lines_run(chunks) <= 40 * len(chunks) + 12 * skipped + 20
    # and what it kept is the body itself, less its long strings
    skeleton = Skeleton()
    for chunk in chunks:
        skeleton.feed(chunk)
    assert skeleton.overflow or _read(skeleton.parse()) == _expected(body)


def test_a_short_string_cannot_forge_a_length() -> None:
    # The defect: `"\u0000" + 500 digits` read back as a skipped string of that many tokens,
    # a prompt-size class (and a metric label) of the sender's choosing.
    skeleton = Skeleton()
    skeleton.feed(json.dumps({"prompt": "\x00" + "9" * 500}).encode())
    assert text_length(skeleton.parse()["prompt"]) == 501


def _llmwarm_lines(work: Callable[[], object]) -> int:
    """Python lines of llmwarm's own code that `work` runs (its cost, counted as steps)."""
    package = str(Path(Skeleton.feed.__code__.co_filename).parents[1])
    count = 0

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if not frame.f_code.co_filename.startswith(package):
            return None
        if event == "line":
            count += 1
        return trace

    sys.settrace(trace)
    try:
        work()
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize("body", list(HOSTILE.values()), ids=list(HOSTILE))
def test_classifying_a_hostile_body_costs_steps_a_field_not_a_string(body: Any) -> None:
    # The defect: the coverage read a prompt's length a Python step per string of a batch
    # (a prompt of 100,000 short strings: 12 ms on the serving loop, for each request). Now its
    # strings are counted in C passes (`texts_length`), and a step or two per long string
    # (one per LONG bytes at most) reads its length back.
    from llmwarm.traffic import coverage

    skeleton = Skeleton()
    skeleton.feed(json.dumps({"model": "m", "max_tokens": 4, **body}).encode())
    data = skeleton.parse()
    served = frozenset({"completions"})
    lines = _llmwarm_lines(lambda: coverage.classify("completions", data, b"", 1, served))
    skipped = sum(1 for v in body.values() for s in (v if isinstance(v, list) else [v])
                  if len(json.dumps(s)) - 2 > LONG)  # fmt: skip
    assert lines <= 300 + 3 * skipped, lines


def test_a_batchs_length_counts_each_string_and_reads_skipped_ones_back() -> None:
    from llmwarm.traffic.skeleton import texts_length

    skeleton = Skeleton()
    skeleton.feed(json.dumps({"p": ["x" * (LONG + 1), "ab", "7", "y" * (LONG + 88)]}).encode())
    batch = skeleton.parse()["p"]
    assert texts_length(batch) == ((LONG + 1) + 2 + 1 + (LONG + 88), 4)
    assert texts_length([1, 2, 3]) == (0, 0) and texts_length([]) == (0, 0)


@pytest.mark.parametrize(
    "body", [HOSTILE["a hundred thousand short strings"], HOSTILE["thirty thousand keys"]],
    ids=["short strings", "keys"],
)  # fmt: skip
def test_past_64_kib_a_body_dense_in_tiny_strings_is_read_no_further(body: Any) -> None:
    # The defect: read to its end, each such body held the serving loop a few ms (~json.loads
    # of it); sent back to back they kept the loop's lag p99 at 15 ms (benchmarks/loop_lag.py).
    raw = json.dumps(body).encode()
    chunks = [raw[i : i + 65536] for i in range(0, len(raw), 65536)]
    assert len(chunks) > 2
    skeleton = Skeleton()
    for chunk in chunks:
        skeleton.feed(chunk)
    assert skeleton.unread == "dense" and skeleton.parse() is None
    # its cost: the first 64 KiB read as any body is, then a count a chunk
    assert _lines_run(chunks) <= _lines_run(chunks[:1]) + 12 * len(chunks)


def test_what_users_send_is_never_dense() -> None:
    # long chats, code with escapes, images, token IDs: read to their end, whatever their size
    code = 'def f(x):\n    return "x" + str(x)\n' * 30
    bodies = [
        {"messages": [{"role": "user", "content": f"turn {i}: " + "words " * 40}
                      for i in range(600)]},
        {"messages": [{"role": "user", "content": code}] * 200},
        {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 900_000}},
        ]}]},
        {"prompt": list(range(30_000))},
        {"prompt": json.dumps([{"id": i, "name": f"n{i}", "ok": True} for i in range(4000)])},
    ]  # fmt: skip
    for body in bodies:
        raw = json.dumps(body).encode()
        assert len(raw) > DENSE_AFTER
        skeleton = Skeleton()
        for i in range(0, len(raw), 65536):
            skeleton.feed(raw[i : i + 65536])
        assert skeleton.unread is None and _read(skeleton.parse()) == _expected(body)


@pytest.mark.parametrize("name", ["escaped quotes", "backslashes"])
def test_a_string_of_escapes_is_counted_not_copied(name: str) -> None:
    # The review's body: 400 KB of escaped quotes. Inside a string whose quotes in a chunk are
    # all escaped, a chunk costs a few counts in C, where it cost two replaces, each a new copy
    # of the chunk with a step per escape (~json.loads's time); a chunk with no quote at all (a
    # prompt of backslashes) its last bytes looked at, where it cost the same two replaces.
    # Copies show as memory; counts none.
    import tracemalloc

    raw = json.dumps(HOSTILE[name]).encode()
    chunks = [raw[i : i + 65536] for i in range(0, len(raw), 65536)]
    skeleton = Skeleton()
    skeleton.feed(chunks[0])  # opens the string
    tracemalloc.start()
    try:
        for chunk in chunks[1:]:
            skeleton.feed(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32768  # no copy of a 64 KiB chunk
    assert _read(skeleton.parse()) == _expected(HOSTILE[name])
