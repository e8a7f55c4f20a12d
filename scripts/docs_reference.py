"""Reference pages generated from the code at every docs build (mkdocs-gen-files), so they
cannot drift from it: the CLI by typer's own docs generator, the profile and the report from
their JSON Schemas; and ARCHITECTURE.md, the package map first, as the architecture page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mkdocs_gen_files
import typer
from typer.cli import get_docs_for_click

from llmwarm.cli import app
from llmwarm.model.profile import Profile
from llmwarm.model.report import Report


def cli() -> str:
    command = typer.main.get_command(app)
    ctx = typer.Context(command, obj={"TYPER_RICH_MARKUP_MODE": None})
    docs = get_docs_for_click(obj=command, ctx=ctx, name="llmwarm", title="CLI reference")
    return docs.strip() + "\n"


def _type(field: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in field:
        name = field["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in field:
        return " or ".join(_type(option, defs) for option in field["anyOf"])
    if "enum" in field:
        return " \\| ".join(f"`{value}`" for value in field["enum"])
    if field.get("type") == "array":
        return f"list of {_type(field.get('items', {}), defs)}"
    return str(field.get("type", "any"))


def _default(field: dict[str, Any]) -> str:
    if "default" not in field:
        return "required"
    value = repr(field["default"]).replace("|", "\\|")
    return f"`{value}`" if len(value) < 60 else "(long; see the shipped profiles)"


def schema(model: type[Profile] | type[Report], title: str, intro: str) -> str:
    doc = model.model_json_schema()
    defs = doc.get("$defs", {})
    lines = [f"# {title}", "", intro, ""]
    for name, section in [(doc["title"], doc), *sorted(defs.items())]:
        lines += [f"## {name}", "", section.get("description", "").strip(), "",
                  "| field | type | default | what it is |", "|---|---|---|---|"]  # fmt: skip
        for key, field in section.get("properties", {}).items():
            text = " ".join(field.get("description", "").split()).replace("|", "\\|")
            lines.append(f"| `{key}` | {_type(field, defs)} | {_default(field)} | {text} |")
        lines.append("")
    return "\n".join(lines)


with mkdocs_gen_files.open("reference/cli.md", "w") as out:
    out.write(cli())
with mkdocs_gen_files.open("reference/profile.md", "w") as out:
    out.write(
        schema(
            Profile,
            "Profile reference",
            "Every field of a warm-up profile (YAML), "
            "from its JSON Schema (`llmwarm profile schema` prints it whole).",
        )
    )
with mkdocs_gen_files.open("reference/report.md", "w") as out:
    out.write(
        schema(
            Report,
            "Report reference",
            "Every field of the warm-up report "
            "(`--report`, `GET /warmup/report`), from its JSON Schema.",
        )
    )
# ARCHITECTURE.md (the package map first) as the site's contributor page, its links to docs/
# pages made site links
architecture = (Path(__file__).resolve().parents[1] / "ARCHITECTURE.md").read_text()
with mkdocs_gen_files.open("architecture.md", "w") as out:
    out.write(architecture.replace("](docs/", "]("))
