"""Bad input: a clear message naming the field or flag, exit 2, never a traceback."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmwarm import __version__
from llmwarm.cli import app
from tests.conftest import LLMWARM, engine_env

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    # An uncaught exception would be a traceback for the user.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def test_version() -> None:
    assert invoke("--version") == (0, f"llmwarm {__version__}\n")


def test_help_documents_exit_codes() -> None:
    code, out = invoke("serve", "--help")
    assert code == 0
    assert "MODEL" in out and "--profile" in out and "130" in out


def test_missing_profile_file(tmp_path: Path) -> None:
    code, out = invoke("serve", "some/model", "--profile", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert "--profile" in out and "does not exist" in out


def test_malformed_profile_names_each_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("buckets:\n  - {prompt_tokens: 0, concurrency: 1, max_tokens: x}\nroundz: 1\n")
    code, out = invoke("warm", "some/model", "--profile", str(bad))
    assert code == 2
    assert "• buckets.0.prompt_tokens: Input should be greater than 0 (got 0)" in out
    assert "• buckets.0.max_tokens:" in out and "(got 'x')" in out
    assert "• roundz: Extra inputs are not permitted" in out


def test_report_into_missing_directory(tmp_path: Path) -> None:
    code, out = invoke("warm", "m", "--report", str(tmp_path / "no" / "r.json"))
    assert code == 2 and "--report" in out


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--bogus-flag", "1"], "unrecognized arguments: --bogus-flag"),
        (["--max-model-len", "lots"], "--max-model-len"),
        (["--dtype", "float7"], "--dtype"),
        (["--headless"], "--headless is not supported"),
        (["--api-server-count", "2"], "--api-server-count is not supported"),
    ],
)
def test_bad_vllm_flags(tiny_model: Path, args: list[str], says: str) -> None:
    code, out = invoke("serve", str(tiny_model), *args)
    assert code == 2, out
    assert says in out


@pytest.mark.parametrize("model", ["/no/such/model", "./not-here"])
def test_missing_model_directory(model: str) -> None:
    code, out = invoke("serve", model)
    assert code == 2
    assert "• MODEL:" in out and model in out


def test_vllm_help_lists_vllm_flags() -> None:
    code, out = invoke("serve", "--vllm-help")
    assert code == 0
    assert "--max-model-len" in out and "--tensor-parallel-size" in out


def test_port_in_use_fails_before_the_engine_loads(tiny_model: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [*LLMWARM, "serve", str(tiny_model), "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            env=engine_env(),
        )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"127.0.0.1:{port} is already in use" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "EngineCore" not in proc.stderr  # refused before any engine started
