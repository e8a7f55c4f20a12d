"""End to end on a real instruct model: SmolLM2-135M-Instruct, served warm by llmwarm."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.launch import serving

pytestmark = pytest.mark.e2e


def test_smollm2_served_warm_answers_paris_and_keeps_the_warmup_out_of_the_access_log(
    smollm2: Path, tmp_path: Path
) -> None:
    flags = ("--served-model-name", "smollm2", "--dtype", "float32")  # see make_smollm2.py
    with serving(smollm2, tmp_path, *flags) as (proc, client, _):
        log = tmp_path / "log"
        # hundreds of warm-up requests went through vLLM's app, none in the access log
        assert "POST /v1/" not in log.read_text(errors="replace")
        sdk = openai.OpenAI(base_url=str(client.base_url).rstrip("/") + "/v1", api_key="none")
        answer = sdk.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
        )
        text = answer.choices[0].message.content or ""
        assert "Paris" in text, text
        # a user's request is logged as vLLM logs it
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if "POST /v1/" in ln]
        assert len(lines) == 1 and "/v1/chat/completions" in lines[0] and "200" in lines[0]
