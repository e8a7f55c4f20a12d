"""A process tree like vLLM's, for tests/test_lifeline.py: a parent (llmwarm) starts a child
(EngineCore) with multiprocessing, which starts a grandchild (a worker) the same way.

    python -c 'from tests.lifeline_tree import parent; parent("spawn", armed=True)'
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from llmwarm import lifeline


def _context(method: str) -> Any:
    return multiprocessing.get_context(method)


def child(method: str) -> None:
    grandchild = _context(method).Process(target=time.sleep, args=(3600,))
    grandchild.start()
    print(grandchild.pid, flush=True)
    time.sleep(3600)


def parent(method: str, armed: bool) -> None:
    if armed:
        lifeline.arm()
    _context(method).Process(target=child, args=(method,)).start()
    time.sleep(3600)
