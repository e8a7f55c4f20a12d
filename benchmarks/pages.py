"""The docs pages the benchmarks write: their sections, and the options the side-by-side ones
share."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.launch import ROOT


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


def named_models(parser: argparse.ArgumentParser) -> None:
    """`--model NAME=PATH`, required and repeatable; a bare PATH is named by its folder."""
    parser.add_argument(
        "--model", required=True, action="append",
        help="NAME=PATH (repeatable); a bare PATH is named by its folder",
    )  # fmt: skip


def by_name(specs: list[str]) -> dict[str, str]:
    """{name: path} of `named_models`' values."""
    return {
        name if sep else Path(path).name: path
        for name, sep, path in (m.partition("=") if "=" in m else ("", "", m) for m in specs)
    }
