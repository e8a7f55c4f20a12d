"""Engine processes end with llmwarm, however llmwarm ends.

vLLM's EngineCore does not watch its parent: when the process that started it is SIGKILLed
(the OOM killer, a kubelet at the end of the grace period), it lives on, owned by init, holding
memory and a GPU (plain `vllm serve` behaves the same). Its workers do watch it (a death pipe).

So every process llmwarm's engine starts watches llmwarm and the process that started it.
`arm()` (in llmwarm, before the engine starts) puts llmwarm's pid in `ENV`, and starts the watch
in each child: one started by fork from a fork hook; one started by spawn (vLLM's choice on CPU
and once CUDA is initialised) by running this module as the child's main module (spawn runs the
parent's main module in the child, but never a package's `__main__`, so `python -m llmwarm`
would give it nothing to run); the child's own children inherit that main module.

Each such process also leaves llmwarm's process group, so that a signal to the group stops
llmwarm, which drains in-flight requests and then stops the engine, in that order.

A watch polls: once llmwarm is gone, or the process that started the child (the child was
handed to init or a subreaper), it asks its own process to stop (SIGTERM: vLLM's EngineCore
shuts down and ends its workers), and `GRACE_S` later kills its children and itself (a loading
vLLM ignores SIGTERM). Polling, not PR_SET_PDEATHSIG: that fires when the parent *thread* ends,
and llmwarm builds its engine in a thread.
"""

from __future__ import annotations

import contextlib
import multiprocessing.spawn
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

ENV = "LLMWARM_LIFELINE"  # the pid of the llmwarm process the engine's processes end with
POLL_S = 0.5
GRACE_S = 3.0

_armed = False


def arm() -> None:
    """In llmwarm's own process, before it starts the engine: its children watch it."""
    global _armed
    os.environ[ENV] = str(os.getpid())
    if not _armed:
        os.register_at_fork(after_in_child=_watch)
        spawn = multiprocessing.spawn
        spawn.get_preparation_data = _main_here(spawn.get_preparation_data)  # type: ignore[assignment]
        _armed = True


def _main_here(original: Callable[[str], dict[str, Any]]) -> Callable[[str], dict[str, Any]]:
    """Spawned children run this module as their main, when llmwarm's is its own."""

    def prepared(name: str) -> dict[str, Any]:
        data = original(name)
        main = str(data.get("init_main_from_name") or data.get("init_main_from_path") or "")
        if not main or main.startswith("llmwarm") or os.path.basename(main) == "llmwarm":
            data.pop("init_main_from_path", None)
            data["init_main_from_name"] = __name__
        return data

    return prepared


def _watch() -> None:
    armed_by = os.environ.get(ENV)
    if armed_by is None or int(armed_by) == os.getpid():
        return
    # A process group of its own: a signal to llmwarm's group (`kill -- -PGID`, `timeout`,
    # Ctrl-C in a terminal) reaches llmwarm, which drains and then stops the engine in order,
    # rather than the engine dying under in-flight requests. (systemd's control-group stop
    # signals every process of the unit whatever its group: KillMode=mixed, deploy/systemd.)
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    threading.Thread(
        target=_until_gone, args=(int(armed_by), os.getppid()), name="llmwarm-lifeline",
        daemon=True,
    ).start()  # fmt: skip


def watch_parent() -> None:
    """In a helper process llmwarm started itself (its warm-up client): end once it is gone."""
    parent = os.getppid()
    threading.Thread(
        target=_until_gone, args=(parent, parent), name="llmwarm-lifeline", daemon=True
    ).start()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _until_gone(llmwarm: int, parent: int, poll: float = POLL_S) -> None:
    while os.getppid() == parent and _alive(llmwarm):
        time.sleep(poll)
    print(
        f"llmwarm lifeline: llmwarm ({llmwarm}) is gone: stopping process {os.getpid()}",
        file=sys.stderr,
        flush=True,
    )
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__mp_main__":  # a process spawned under an armed llmwarm (see `arm`)
    _watch()
