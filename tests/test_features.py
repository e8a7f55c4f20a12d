from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from llmwarm.model.features import DEFAULT_SCHEMA, Feature, Features, apply


def body(feature: str, endpoint: str, features: Features) -> dict[str, Any]:
    """The body fields one feature adds on one endpoint."""
    return apply(Feature.parse(feature), endpoint, features, {})


@pytest.mark.parametrize(
    ("feature", "endpoint", "expected"),
    [
        ("greedy", "chat", {}),
        ("sampling", "completions",
         {"temperature": 0.8, "top_p": 0.95, "top_k": 50, "min_p": 0.05, "seed": 1234}),
        ("penalties", "chat",
         {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1}),
        ("logprobs", "completions", {"logprobs": 5}),
        ("logprobs", "chat", {"logprobs": True, "top_logprobs": 5}),
        ("prompt_logprobs", "chat", {"prompt_logprobs": 1}),
        ("n", "completions", {"n": 2, "temperature": 0.8, "seed": 1234}),
        ("stop", "chat", {"stop": ["\n\n", "."]}),
        ("json_object", "completions", {"response_format": {"type": "json_object"}}),
        ("json_schema", "chat", {"response_format": {
            "type": "json_schema", "json_schema": {"name": "llmwarm", "schema": DEFAULT_SCHEMA}}}),
        ("choice", "chat", {"structured_outputs": {"choice": ["yes", "no", "maybe"]}}),
        ("lora:sql", "chat", {"model": "sql"}),
    ],
)  # fmt: skip
def test_bodies(feature: str, endpoint: str, expected: dict[str, object]) -> None:
    assert body(feature, endpoint, Features()) == expected


def test_regex_and_grammar_use_the_configured_text() -> None:
    features = Features(regex="[0-9]+", grammar='root ::= "a"')
    assert body("regex", "chat", features) == {"structured_outputs": {"regex": "[0-9]+"}}
    assert body("grammar", "chat", features) == {"structured_outputs": {"grammar": 'root ::= "a"'}}


def test_lora_expands_to_one_kind_per_adapter() -> None:
    features = Features(use=["greedy", "lora", "logprobs"], lora=["a", "b"])
    assert list(map(str, features.features())) == ["greedy", "lora:a", "lora:b", "logprobs"]


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"json_schema": {"type": "objekt"}}, "not a valid JSON Schema"),
        ({"regex": "(unclosed"}, "not a valid regular expression"),
        ({"use": ["beam_search"]}, "'beam_search'"),
        ({"n": 1}, "greater than or equal to 2"),
        ({"choice": ["only"]}, "at least 2"),
    ],
)
def test_bad_features(fields: dict[str, object], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        Features.model_validate(fields)


@pytest.mark.parametrize(
    ("text", "says"),
    [("telepathy", "unknown feature 'telepathy'"), ("logprobs:5", "takes no argument"),
     ("lora", "needs an adapter name"), ("lora:", "takes no argument")],
)  # fmt: skip
def test_a_feature_that_is_not_one_says_what_is_off(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Feature.parse(text)


def test_tools_is_a_named_tool_call() -> None:
    fields = body("tools", "chat", Features())
    assert fields["tools"][0]["function"]["name"] == "get_weather"
    assert fields["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


def test_images_are_one_kind_per_size_and_real_pngs() -> None:
    import base64
    import io

    from PIL import Image

    from llmwarm.model.features import apply, image_data_url, in_body

    features = Features(use=["greedy", "image"], images=["64x48", "300x200"])
    assert list(map(str, features.features())) == ["greedy", "image:64x48", "image:300x200"]
    messages = [{"role": "user", "content": "describe"}]
    request: dict[str, Any] = {"messages": messages, "max_tokens": 4}
    with_image = apply(Feature.parse("image:300x200"), "chat", features, request)
    text, image = with_image["messages"][0]["content"]
    assert text == {"type": "text", "text": "describe"}
    url = image["image_url"]["url"]
    assert url == image_data_url("300x200") and url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (300, 200)
    assert in_body(with_image) == {"image"} and in_body(request) == set()
    assert messages[0]["content"] == "describe"  # the original is untouched


@pytest.mark.parametrize("size", ["64", "0x10", "10x", "axb", "9000x10"])
def test_bad_image_sizes(size: str) -> None:
    with pytest.raises(ValidationError, match="WIDTHxHEIGHT"):
        Features(images=[size])
