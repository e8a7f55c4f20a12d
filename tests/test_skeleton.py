"""A request body read as its chunks go by, all but its long strings (`llmwarm.skeleton`)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from llmwarm.skeleton import LONG, MAX_KEPT, Skeleton, text_length


def _expected(value: Any) -> Any:
    """`value` with every string longer than `LONG` (in UTF-8 bytes) as its placeholder."""
    if isinstance(value, str):
        size = len(json.dumps(value, ensure_ascii=False)[1:-1].encode())
        return value if size <= LONG else f"\x00{size}"
    if isinstance(value, list):
        return [_expected(v) for v in value]
    if isinstance(value, dict):
        return {_expected(k): _expected(v) for k, v in value.items()}
    return value


texts = st.one_of(
    st.text(max_size=20),
    st.text(alphabet='ab"\\\n/é😀', max_size=30),  # quotes, backslashes, escapes, non-ASCII
    st.builds(lambda n, c: c * n, st.integers(LONG - 5, LONG * 3), st.sampled_from('a"\\é')),
)
values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(body=st.dictionaries(texts, values, max_size=6), cuts=st.lists(st.integers(1, 50)))
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
    assert skeleton.parse() == _expected(body)


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
    assert huge.overflow and huge.parse() is None
