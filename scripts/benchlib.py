"""What the benchmark scripts share: launching a server until ready, and the docs page."""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def launched(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`cmd` running, its output appended to `log`; SIGTERM on exit (SIGKILL after 60 s)."""
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_ready(proc: subprocess.Popen[bytes], url: str, ready_path: str, log: Path) -> None:
    """Until `ready_path` answers 200 (SystemExit if the process exits first)."""
    with httpx.Client(base_url=url, timeout=30) as client:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args!r:.80} exited with {proc.returncode}; see {log}")
            try:
                if client.get(ready_path).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)


@contextlib.contextmanager
def ready_server(
    cmd: list[str], url: str, ready_path: str, env: dict[str, str], log: Path
) -> Iterator[float]:
    """Launch `cmd`, wait until `ready_path` answers 200; the seconds that took. SIGTERM on exit."""
    start = time.perf_counter()
    with launched(cmd, env, log) as proc:
        wait_ready(proc, url, ready_path, log)
        yield time.perf_counter() - start


ROOT = Path(__file__).resolve().parent.parent


def write_section(page: Path, name: str, body: str) -> None:
    """Put `body` between `<!-- NAME:start -->` and `<!-- NAME:end -->`, appending the
    markers at the end of the page the first time; the rest of the page is kept. Paths inside
    this checkout are written as a user types them from its root (`.cache/tiny-llama`), never
    as this machine's absolute paths."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    body = body.replace(f"{ROOT}/", "")
    block = f"{start}\n{body.strip()}\n{end}"
    text = page.read_text(encoding="utf-8") if page.exists() else ""
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + block + after
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    page.write_text(text, encoding="utf-8")


def model_options(parser: argparse.ArgumentParser, log: Path, runs: int = 2) -> None:
    """The options the side-by-side scripts share: models, runs, where the page and log go."""
    parser.add_argument("--model", action="append", default=[],
                        help="NAME=PATH, repeatable (default: tiny=.cache/tiny-llama)")  # fmt: skip
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--docs", type=Path, default=log.parent.parent / "docs")
    parser.add_argument("--log", type=Path, default=log)


def models(args: argparse.Namespace, root: Path) -> list[tuple[str, str]]:
    """(name, path) of each `--model NAME=PATH`, the tiny model by default."""
    specs = args.model or [f"tiny={root / '.cache' / 'tiny-llama'}"]
    args.model = specs
    args.log.parent.mkdir(parents=True, exist_ok=True)
    return [(spec.partition("=")[0], spec.partition("=")[2]) for spec in specs]
