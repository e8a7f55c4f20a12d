"""What the operator reads: the warm-up's tables in the terminal, a profile's plan, and the plot
of latency per round (a PNG)."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from llmwarm import files
from llmwarm.model import endpoints
from llmwarm.model.endpoints import SPECS
from llmwarm.model.profile import Profile
from llmwarm.model.report import Report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _ratio(first: float | None, steady: float | None) -> str:
    if first is None or not steady:
        return "-"
    return f"{first / steady:.2f}x"


def _cold_warm(first: float | None, warm: float | None) -> str:
    return f"{_ms(first)}→{_ms(warm)}" if first is not None else "-"


def buckets_table(report: Report) -> Table:
    """The buckets that ran, one row each: rounds (✓ converged), first round → warm, in ms."""
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    t.add_column("bucket", no_wrap=True)
    t.add_column("rounds", justify="right", no_wrap=True)
    for label in ("TTFT ms", "TPOT ms", "e2e ms"):
        t.add_column(label, justify="right", no_wrap=True)
    t.add_column("first/warm", justify="right", no_wrap=True)
    window = report.convergence.window
    for b in report.buckets:
        if not b.rounds:
            continue  # (not run: `skipped_line` says how many and why)
        mark = "✓" if b.converged else "✗"
        cells = [b.key, f"{len(b.rounds)} {mark}"]
        cells += [_cold_warm(b.first(m), b.warm(m, window)) for m in ("ttft", "tpot", "e2e")]
        cells.append(_ratio(b.first("e2e"), b.warm("e2e", window)))
        t.add_row(*cells)
    return t


def skipped_line(report: Report) -> str | None:
    """One line for the optional buckets no round reached: how many, why, what changes it."""
    skipped = [b for b in report.buckets if not b.rounds and b.optional]
    if not skipped:
        return None
    share = report.optional_share
    why = (
        f"the warm-up had spent its share of the engine's start ({share:.0%}, the profile's "
        "budget.optional_share: raise it to warm them)"
        if share is not None
        else "the warm-up's budget ran out (the profile's budget)"
    )
    return f"+{len(skipped)} optional buckets not run: {why}"


# The kinds grid's column headings: endpoint (abbreviated to fit 80 columns) and mode.
_SHORT = {
    "completions": "cmpl", "chat": "chat", "responses": "resp", "messages": "msgs",
    "embeddings": "embed", "pooling": "pool", "classify": "class", "score": "score",
    "rerank": "rank",
}  # fmt: skip


def kinds_grid(report: Report) -> Table:
    """Request kinds as a grid: endpoints (x streaming) as columns, features as rows. A cell is
    ✓ warmed, N.N× (warmed and measured twice: its first request over its warm one), ✗ not
    warmed though the model serves it, or – (the endpoint or mode takes no such feature)."""
    from llmwarm.model.features import Feature
    from llmwarm.model.kinds import Kind

    measured = {k.kind: k for k in report.kinds}
    served = [e for e in endpoints.SPECS if e in report.endpoints] or sorted(
        {k.endpoint for k in measured}
    )
    columns = [(e, s) for e in served for s in (False, True) if not s or SPECS[e].streamable]
    rows = [None, *map(Feature.parse, report.features)]
    rows = [f for f in rows if f is None or f.name != "greedy"]
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    t.add_column("kind", no_wrap=True)
    for endpoint, stream in columns:
        t.add_column(f"{_SHORT[endpoint]}\n{'str' if stream else '-'}", justify="right")
    for feature in rows:
        cells = []
        for endpoint, stream in columns:
            if feature is not None and not feature.spec.takes(endpoint, stream):
                cells.append("–")
                continue
            summary = measured.get(Kind(endpoint, stream, (feature,) if feature else ()))
            if summary is None:
                cells.append("✗")
            elif summary.warm_e2e_s:
                cells.append(f"{summary.cold_e2e_s / summary.warm_e2e_s:.1f}×")
            else:
                cells.append("✓")
        t.add_row("plain" if feature is None else str(feature), *cells)
    return t


def closing_line(report: Report) -> str:
    """Engine start, warm-up and its share, requests, the verdict (the unconverged buckets are
    the table's ✗)."""
    start, warm = report.engine_start_s, report.warmup_s
    share = warm / (start + warm) if start + warm > 0 else 0.0
    if report.error is not None:
        verdict = "FAILED (the report's error says why)"
    elif report.converged:
        verdict = "converged"
    else:
        verdict = f"NOT converged ({len(report.unconverged)} ✗)"
    warmed = f"engine start {start:.1f} s + warm-up {warm:.1f} s ({share:.0%})"
    return " · ".join([warmed, f"{report.requests} requests", verdict])


def summary(report: Report, where: Path | None = None) -> Group:
    """The warm-up at a glance, in 80 columns: its buckets, its request kinds, one line."""
    title = Text(f"llmwarm warm-up of {report.model}", style="bold")
    parts: list[RenderableType] = [title, buckets_table(report)]
    if (line := skipped_line(report)) is not None:
        parts.append(Text(line))
    parts += [
        kinds_grid(report),
        Text("✓ warmed  N.N× its first request over a warm one  ✗ not warmed  – n/a", "dim"),
        Text(closing_line(report), style="bold", no_wrap=True, overflow="ellipsis"),
    ]
    if where is not None:
        parts.append(Text(f"report: {where}", style="dim"))
    return Group(*parts)


def plan_table(profile: Profile, source: str) -> Group:
    """What a profile will send, in 80 columns: buckets in run order (optional ones apart),
    the request kinds each sends, requests per round; then the totals and the features."""
    from llmwarm.model.corpus import kinds, requests_per_round, requests_per_sweep

    rule = profile.convergence
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    for column in ("bucket", "prompt", "at once", "output", "kinds", "req/round", "sweep"):
        t.add_column(column, justify="left" if column == "bucket" else "right", no_wrap=True)
    low = high = 0
    # the required buckets, then the optional ones (dim: run as time allows)
    for b in sorted(profile.buckets, key=lambda b: b.optional):
        per_round, per_sweep = requests_per_round(profile, b), requests_per_sweep(profile, b)
        sweeps = per_sweep * (2 if profile.check else 1)  # and the check, if asked
        if not b.optional:
            low += per_round * rule.earliest + sweeps
            high += per_round * rule.max_rounds + sweeps
        t.add_row(
            b.name, str(b.prompt_tokens), str(b.concurrency), str(b.max_tokens),
            str(len(kinds(profile, b))), str(per_round), str(sweeps or "-"),
            style="dim" if b.optional else None,
        )  # fmt: skip
    lines: list[RenderableType] = [Text(f"warm-up plan of {source}", style="bold"), t]
    if optional := sum(b.optional for b in profile.buckets):
        lines.append(Text(f"({optional} optional buckets, dim: as time allows)", style="dim"))
    if profile.auto is not None:
        lines.append(Text("+ auto buckets from the engine's limits (pass --model to resolve them)"))
    use = ", ".join(map(str, profile.features.features()))
    check = " and after the last round (the check)" if profile.check else ""
    lines += [
        Text(
            f"{low}–{high} requests in the required buckets ({rule.earliest}–{rule.max_rounds} "
            f"rounds a bucket, until {rule.metric} converges)"
        ),
        Text(
            f"features: {use}; on {', '.join(sorted(profile.feature_buckets())) or '-'}, every "
            f"kind sent at once after round 1{check}",
            style="dim",
        ),
    ]
    return Group(*lines)


def plot(report: Report, path: Path, option: str = "--plot") -> None:
    """Latency per round per bucket (TTFT, TPOT), the converged round marked; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    # TTFT only where a round sent new prompts (later rounds resend theirs: decode only)
    titles = (("ttft", "time to first token (rounds with new prompts)"),
              ("tpot", "time per output token"))  # fmt: skip
    for ax, (metric, label) in zip(axes, titles, strict=True):
        for b in (b for b in report.buckets if b.rounds):  # optional buckets not run: none
            rounds = [round_ for round_, _ in b.measured(metric)]
            values = [v * 1000 for v in b.series(metric)]
            (line,) = ax.plot(rounds, values, marker="o", markersize=3, label=b.key)
            if b.converged_at is not None and b.converged_at in rounds:
                at = rounds.index(b.converged_at)
                ax.plot(rounds[at], values[at], marker="*", markersize=14, color=line.get_color())
        ax.set_title(label)
        ax.set_xlabel("round (1 = cold)")
        ax.set_ylabel("median, ms")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3, which="both")
    axes[1].legend(fontsize="small", loc="best")
    fig.suptitle(
        f"llmwarm warm-up of {report.model}: ★ = converged "
        f"({report.convergence.metric}, window {report.convergence.window}, "
        f"spread ≤ {report.convergence.spread:.0%})"
    )
    try:
        with files.atomic(path, option) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
