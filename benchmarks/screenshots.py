"""The getting-started page's pictures, from a real warm-up: what the terminal shows at its end
(rich's SVG export of llmwarm's own summary, 80 columns) and the `--plot` PNG, so they stay
true. Runs `llmwarm warm` on SmolLM2-135M-Instruct as `scripts/demo` serves it, then writes
docs/warmup-summary.svg, docs/warmup-example.png, and the summary as text in the page's
`summary` section (with the command and how long the start took).

    python -m benchmarks.screenshots
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from benchmarks.launch import ROOT, engine_env
from benchmarks.pages import write_section
from llmwarm.model.report import Report
from llmwarm.serve.display import summary

FLAGS = ["--served-model-name", "smollm2", "--dtype", "float32",
         "--gpu-memory-utilization", "0.5", "--max-model-len", "2048"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(".cache/smollm2"))
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    subprocess.run([sys.executable, "scripts/make_smollm2.py", str(args.model)], check=True)
    plot = args.docs / "warmup-example.png"
    env = engine_env(VLLM_USE_AOT_COMPILE="0")
    with tempfile.TemporaryDirectory(prefix="llmwarm-screenshots-") as tmp:
        report_path = Path(tmp) / "report.json"
        cmd = ["llmwarm", "warm", str(args.model), *FLAGS, "--report", "report.json",
               "--plot", "warmup-example.png"]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "llmwarm", *cmd[1:3], *FLAGS, "--report", str(report_path),
             "--plot", str(plot)],
            check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        took = time.perf_counter() - start
        report = Report.model_validate_json(report_path.read_text())
    console = Console(record=True, width=80, force_terminal=True, color_system="truecolor")
    console.print(summary(report, Path("report.json")))
    text = console.export_text(clear=False)
    console.save_svg(str(args.docs / "warmup-summary.svg"), title="llmwarm warm")
    body = f"""```
$ {" ".join(cmd)}
{text.rstrip()}
```

(`python -m benchmarks.screenshots`, {datetime.now(timezone.utc):%Y-%m-%d}: this machine's 2
CPU cores, {took:.0f} s from launch to the end of the warm-up, engine start {
        report.engine_start_s:.0f} s.)"""
    write_section(args.docs / "getting-started.md", "summary", body)
    print(text)


if __name__ == "__main__":
    main()
