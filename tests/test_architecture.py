"""ARCHITECTURE.md's package map is the code's (tests/architecture.py renders it), and every
module of llmwarm is in the page's table of modules."""

from __future__ import annotations

import re

from tests.architecture import PAGE, ROOT, on_page, render


def test_the_package_map_on_the_page_is_the_code_s() -> None:
    assert on_page() == render(), "the map is stale: python -m tests.architecture"


def test_every_module_has_its_row_in_the_table() -> None:
    cells = re.findall(r"^\| (`[^|]+) \|", PAGE.read_text(), re.M)  # a row's first cell
    rows = {name for cell in cells for name in re.findall(r"`([\w/]+\.py)`", cell)}
    modules = {
        str(path.relative_to(ROOT / "llmwarm"))
        for path in (ROOT / "llmwarm").rglob("*.py")
        if path.name != "__init__.py"
    }
    assert modules - rows == set(), "modules with no row in ARCHITECTURE.md"
    assert rows - modules == set(), "rows for modules that do not exist"
