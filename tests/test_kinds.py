"""A request kind: one typed value, one string form, one parser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmwarm.model import endpoints, features
from llmwarm.model.features import Feature
from llmwarm.model.kinds import PLAIN, Kind

_plain = [name for name in features.SPECS if name not in ("lora", "image")]
feature_values = st.one_of(
    st.sampled_from(_plain).map(Feature),
    st.from_regex(r"[a-z][a-z0-9_.-]{0,12}", fullmatch=True).map(lambda n: Feature("lora", n)),
    st.tuples(st.integers(1, 4096), st.integers(1, 4096)).map(
        lambda wh: Feature("image", f"{wh[0]}x{wh[1]}")
    ),
    st.just(Feature("image")),
)
kinds = st.builds(
    Kind,
    st.sampled_from(list(endpoints.SPECS)),
    st.booleans(),
    st.lists(feature_values, max_size=4).map(tuple),
)


@given(kinds)
def test_the_string_form_parses_back_to_the_same_kind(kind: Kind) -> None:
    assert Kind.parse(str(kind)) == kind
    assert str(Kind.parse(str(kind))) == str(kind)


def test_features_are_kept_sorted_once_and_plain_means_none() -> None:
    kind = Kind("chat", True, (Feature("stop"), Feature("logprobs"), PLAIN, Feature("stop")))
    assert str(kind) == "chat-stream+logprobs+stop"
    assert Kind.of("chat", False) == Kind("chat") and str(Kind("chat")) == "chat"
    assert kind.singles() == [Kind.parse("chat-stream+logprobs"), Kind.parse("chat-stream+stop")]
    assert Kind("chat").singles() == [Kind("chat")] and Kind("chat").feature == PLAIN


def test_an_image_of_any_size_stands_for_every_size() -> None:
    sized = Kind.parse("chat-stream+image:224x224+logprobs")
    assert sized.general() == Kind.parse("chat-stream+image+logprobs")
    assert str(Kind.parse("completions+lora:sql").general()) == "completions+lora:sql"


@pytest.mark.parametrize(
    ("text", "says"),
    [("chatty", "unknown endpoint 'chatty'"), ("chat+telepathy", "unknown feature"),
     ("chat-stream+lora", "needs an adapter name"), ("chat+logprobs:3", "takes no argument"),
     ("", "unknown endpoint")],
)  # fmt: skip
def test_a_string_that_is_no_kind_says_what_is_off(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Kind.parse(text)
