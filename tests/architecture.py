"""The package map that opens ARCHITECTURE.md, rendered from the code: the layers as
pyproject.toml's import contract orders them (`lint-imports` checks it), each subpackage's
one-line docstring and modules, and what each imports. `tests/test_architecture.py` fails when
the page's map is not this one; write it again with

    python -m tests.architecture
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import grimp
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "ARCHITECTURE.md"
START, END = "<!-- map:start -->", "<!-- map:end -->"


def layers() -> list[list[str]]:
    """The import contract's layers, top first: each a list of `llmwarm.X` siblings."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c["type"] == "layers")
    return [re.split(r"\s*[|:]\s*", layer) for layer in contract["layers"]]


def _docline(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def render() -> str:
    graph = grimp.build_graph("llmwarm")
    units = [unit for layer in layers() for unit in layer]
    lines = [
        "```",
        "llmwarm/   a layer a band, each importing only the bands below it (→ what it imports)",
    ]
    for layer in layers():
        for unit in layer:
            name = unit.removeprefix("llmwarm.")
            package = ROOT / "llmwarm" / name / "__init__.py"
            below = [
                other.removeprefix("llmwarm.")
                for other in units
                if other != unit
                and graph.direct_import_exists(importer=unit, imported=other, as_packages=True)
            ]
            imports = f"  → {', '.join(below)}" if below else ""
            if package.exists():
                modules = sorted(m.rsplit(".", 1)[1] for m in graph.find_children(unit))
                lines.append(f"  {name}/{imports}")
                lines += textwrap.wrap(_docline(package), 94, initial_indent=" " * 6,
                                       subsequent_indent=" " * 6)  # fmt: skip
                lines.append(f"      modules: {' '.join(modules)}")
            else:
                lines.append(f"  {name}.py{imports}")
        lines.append("  " + "─" * 96)
    lines[-1] = "```"
    return "\n".join(lines)


def on_page() -> str:
    text = PAGE.read_text()
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def write() -> None:
    text = PAGE.read_text()
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    PAGE.write_text(f"{before}{START}\n{render()}\n{END}{after}")


if __name__ == "__main__":
    write()
