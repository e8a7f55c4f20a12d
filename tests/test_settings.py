from __future__ import annotations

from pathlib import Path

import pytest

from llmwarm.errors import ModelNotFound, UsageError
from llmwarm.model.profile import shipped
from llmwarm.serve.settings import check_model, check_output_path, resolve


def test_default_profile_ships_with_the_package() -> None:
    assert shipped("default").is_file() and shipped("probe").is_file()


def test_hub_ids_are_left_to_vllm() -> None:
    check_model("Qwen/Qwen3-0.6B")
    check_model("gpt2")


def test_local_model_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    check_model(str(tmp_path))


@pytest.mark.parametrize("name", ["/no/such/model", "./missing-model", "~/missing-model"])
def test_missing_local_model(name: str) -> None:
    with pytest.raises(ModelNotFound) as info:
        check_model(name)
    assert info.value.problems[0][0] == "MODEL"


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound) as info:
        check_model(str(tmp_path))
    assert "has no config.json" in info.value.problems[0][1]


def test_output_path(tmp_path: Path) -> None:
    check_output_path(None, "--report")
    check_output_path(tmp_path / "r.json", "--report")
    with pytest.raises(UsageError, match="is a directory"):
        check_output_path(tmp_path, "--report")
    with pytest.raises(UsageError) as info:
        check_output_path(tmp_path / "missing" / "r.json", "--report")
    assert info.value.problems[0][0] == "--report"


def test_a_learn_directory_that_cannot_be_made_turns_learning_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The defect: `mkdir` of the learn directory inside --cache-dir raised an OSError, a
    # traceback and exit 1 at every start of every replica.
    from llmwarm.backend import caches

    monkeypatch.setattr(caches, "use", lambda directory: None)  # no environment to undo
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "learned").write_text("a file where the directory would go")
    resolved = resolve(
        ["fake/model", "--port", "0"], profile_path=None, report_path=None, plot_path=None,
        on_unconverged="serve", cache_dir=cache_dir, mode="serve", prog="llmwarm serve",
    )  # fmt: skip
    try:
        assert resolved.learn_path is None
        assert "cannot make the learn directory" in caplog.text
    finally:
        assert resolved.cache is not None
        resolved.cache.close()
