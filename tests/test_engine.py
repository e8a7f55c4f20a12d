"""The vLLM adapter's engine, against the installed vLLM's own objects where it reads them."""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass

import pytest

from llmwarm.backend.engine import Engine


@dataclass
class _AsyncLLM:
    """What `Engine` reads of vLLM's `AsyncLLM` to know it is dead (vLLM 0.32's meanings):
    `errored` once the core client's monitor flagged the EngineCore dead or the output handler
    ended; `is_running` until the output handler ended."""

    errored: bool
    is_running: bool

    @property
    def dead_error(self) -> BaseException:
        from vllm.v1.engine.exceptions import EngineDeadError

        error: BaseException = EngineDeadError()
        return error


@pytest.mark.parametrize(
    ("errored", "is_running", "dead"),
    [(False, True, False), (True, True, True), (True, False, True)],
    ids=["alive", "flagged-dead-handler-running", "handler-ended"],
)
def test_the_engine_is_dead_as_soon_as_vllm_says_errored(
    errored: bool, is_running: bool, dead: bool
) -> None:
    # The defect: llmwarm waited for the output handler to end as well, while vLLM's error
    # handler already answered requests 500 and asked its server to stop: a warm-up request
    # failed on a live-looking engine ("request failed"), or serving's path won (exit 5).
    llm = _AsyncLLM(errored=errored, is_running=is_running)
    eng = Engine(llm, Namespace(), start_s=1.0, tasks=("generate",))
    assert eng.is_dead() is dead
    if dead:
        assert "EngineCore encountered an issue" in eng.dead_reason()
