"""The docs: a short front page, and no path of the machine a benchmark ran on."""

from __future__ import annotations

import re

from benchmarks.launch import ROOT

# an absolute path into a checkout's own files (`/home/me/llmwarm/.cache/tiny-llama`)
_MACHINE_PATH = re.compile(r"(?<![\w.~-])/[\w.-]+(?:/[\w.-]+)*/(?:\.cache|llmwarm/configs)/")


def test_the_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150
    text = "\n".join(lines)
    assert "scripts/demo" in text and "scripts/test" in text


def test_no_page_names_a_path_of_the_machine_it_was_written_on() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
             *sorted((ROOT / "docs").rglob("*.json"))]  # fmt: skip
    for page in pages:
        text = page.read_text()
        assert str(ROOT) not in text, page
        found = _MACHINE_PATH.search(text)
        assert found is None, f"{page.name}: {found and found.group(0)}"


def test_the_gpu_pages_h100_capture_plan_is_the_plan_the_code_makes_now() -> None:
    from benchmarks.capture_plan import render

    page = (ROOT / "docs" / "gpu.md").read_text()
    shown = page.split("<!-- h100-plan:start -->\n", 1)[1].split("\n<!-- h100-plan:end -->")[0]
    assert shown == render(), "run `python -m benchmarks.capture_plan`"
