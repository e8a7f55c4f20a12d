"""The CUDA-graph plan of `--capture-sizes-from-profile` at vLLM's H100 defaults beside vLLM's
own default: graphs, the largest (the graph pool grows with it), padding, and the warmed steps
left without a graph. Pure arithmetic on llmwarm's plan and its model of vLLM's default (held to
vLLM's `_set_cudagraph_sizes` by tests/test_cli.py): no GPU runs here. Writes the `h100-plan`
section of docs/gpu.md (tests/test_docs.py checks it is current).

    python -m benchmarks.capture_plan
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.launch import ROOT
from benchmarks.pages import write_section
from llmwarm.backend import capture
from llmwarm.model.fit import EngineShape, auto_buckets
from llmwarm.model.profile import load_profile, shipped

H100 = {"max_num_seqs": 1024, "max_num_batched_tokens": 8192}  # vLLM's API-server defaults
CASES = [  # (what, speculative tokens, decode-only graphs)
    ("the default profile", 0, False),
    ("with 3 speculative tokens (e.g. MTP)", 3, False),
    ("`-cc.cudagraph_mode=FULL_DECODE_ONLY`", 0, True),
]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def render() -> str:
    profile = load_profile(shipped("default"))
    seqs, budget = H100["max_num_seqs"], H100["max_num_batched_tokens"]
    shape = EngineShape(max_model_len=32768, max_num_seqs=seqs, max_num_batched_tokens=budget)
    buckets = list(profile.buckets)
    if profile.auto is not None:
        buckets += auto_buckets(profile.auto, shape, chat=True)
    rows = []
    for what, spec, decode_only in CASES:
        found = capture.steps(buckets, budget, spec, max_num_seqs=seqs, decode_only=decode_only)
        default = capture.vllm_default(seqs, budget, spec)
        plan = capture.plan(found, default, spec_tokens=spec, decode_only=decode_only)
        assert plan.default_largest  # a GPU's default captures
        vllm_left = [s for s in found.weights if s > default[-1]]
        vllm_warmed = capture.mean_padding(default, found.weights)
        rows.append(
            f"| {what} | {len(plan.sizes)} / {len(default)} "
            f"| {plan.sizes[-1]} / {default[-1]} ({plan.sizes[-1] / default[-1]:.0f}x) "
            f"| {_pct(plan.padding)} / {_pct(plan.default_padding)} "
            f"| {_pct(plan.warmed_padding)} / {_pct(vllm_warmed)} "
            f"| {len(plan.uncaptured)} of {len(found.weights)} / "
            f"{len(vllm_left)} of {len(found.weights)} |"
        )
    return "\n".join([
        f"At vLLM's H100 defaults (`max_num_seqs` {seqs}, `max_num_batched_tokens` {budget}),"
        " with the shipped default profile; each cell llmwarm's plan / vLLM's default"
        " (`python -m benchmarks.capture_plan`: arithmetic on the plan and on llmwarm's model of"
        " vLLM's default, which a test holds to vLLM's own code; no GPU ran):",
        "",
        "| configuration | graphs | largest graph, tokens (graph pool) | padding, a step of any"
        " size | padding, the warmed steps | warmed steps without a graph |",
        "|---|---|---|---|---|---|",
        *rows,
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    write_section(args.docs / "gpu.md", "h100-plan", render())


if __name__ == "__main__":
    main()
