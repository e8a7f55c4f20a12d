"""How long a newcomer waits: a fresh clone of this repository, `scripts/demo` typed, until the
answer is printed (set-up into a new .venv with uv's cache as it is, the model built, served
warm, asked). Writes what the demo printed and the time into the getting-started page's
`demo` section, then stops the demo (Ctrl-C, as a user would).

    python -m benchmarks.time_demo
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.launch import ROOT
from benchmarks.pages import write_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--port", default="8765")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmwarm-demo-") as tmp:
        clone = Path(tmp) / "llmwarm"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        # the model's GGUF comes from PyPI like every package; uv's and pip's caches are the
        # machine's
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "LLMWARM"))}
        start = time.perf_counter()
        demo = subprocess.Popen(
            ["scripts/demo"], cwd=clone, env=env | {"PORT": args.port},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        assert demo.stdout is not None
        lines: list[str] = []
        answered = None
        at: dict[str, float] = {}  # when each phase ended, from the start
        closing = ""
        for line in demo.stdout:
            lines.append(line.rstrip("\n"))
            for phase, mark in (("set-up", "setup: ready"), ("model", "llmwarm demo (")):
                if line.startswith(mark):
                    at.setdefault(phase, time.perf_counter() - start)
            if "engine start " in line and " + warm-up " in line:
                closing = line
            if line.startswith("A: "):
                answered = time.perf_counter() - start
            if answered is not None and line.lstrip().startswith("-d '"):  # its last line
                break
        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C: the server drains and stops
        demo.wait()
    if answered is None:
        raise SystemExit("the demo printed no answer:\n" + "\n".join(lines[-40:]))
    shown = lines[next(i for i, line in enumerate(lines) if line.startswith("Q: ")) :]
    shown = [line.replace(args.port, "8000") for line in shown]
    body = f"""```
{chr(10).join(shown)}
```

From a fresh clone to that answer: **{answered / 60:.1f} min** (`python -m benchmarks.time_demo`,
{datetime.now(timezone.utc):%Y-%m-%d}: `scripts/demo` in a new clone with a new `.venv`, uv's
cache warm, this machine's 2 CPU cores){_phases(at, closing, answered)}."""
    write_section(args.docs / "getting-started.md", "demo", body)
    print(body)


def _phases(at: dict[str, float], closing: str, answered: float) -> str:
    """Where the time went: set-up, the model's build, the serve (its engine start and warm-up
    as its closing line gives them), the question."""
    if "set-up" not in at or "model" not in at:
        return ""
    found = re.search(r"engine start ([\d.]+) s \+ warm-up ([\d.]+) s", closing)
    serve = f"serving {answered - at['model']:.0f} s"
    if found:
        serve += f" (engine start {float(found[1]):.0f} s, warm-up {float(found[2]):.0f} s)"
    return (
        f": set-up {at['set-up']:.0f} s, the model {at['model'] - at['set-up']:.0f} s, "
        f"{serve}, the question included"
    )


if __name__ == "__main__":
    main()
