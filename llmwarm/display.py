"""What the operator reads: the warm-up's tables in the terminal, a profile's plan, and the plot
of latency per round (a PNG)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from llmwarm import files
from llmwarm.profile import Profile
from llmwarm.report import Report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _ratio(first: float | None, steady: float | None) -> str:
    if first is None or not steady:
        return "-"
    return f"{first / steady:.2f}x"


def table(report: Report) -> Table:
    """Cold (round 1) against warm (the converged window), per bucket, in milliseconds."""
    state = "converged" if report.converged else f"NOT converged: {', '.join(report.unconverged)}"
    t = Table(
        title=f"llmwarm warm-up: {report.requests} requests in {report.warmup_s:.1f} s "
        f"(engine start {report.engine_start_s:.1f} s); {state}",
        title_justify="left",
    )
    t.add_column("bucket")
    t.add_column("rounds", justify="right")
    t.add_column("converged")
    for label in ("TTFT", "TPOT", "e2e"):
        t.add_column(f"{label} cold", justify="right")
        t.add_column(f"{label} warm", justify="right")
    t.add_column("e2e cold/warm", justify="right")
    t.add_column("noise", justify="right")
    window = report.convergence.window
    for b in report.buckets:
        verdict = f"round {b.converged_at}" if b.converged else f"no ({b.stop_reason})"
        cells = [b.key, str(len(b.rounds)), verdict]
        for metric in ("ttft", "tpot", "e2e"):
            cells += [_ms(b.first(metric)), _ms(b.warm(metric, window))]
        cells.append(_ratio(b.first("e2e"), b.warm("e2e", window)))
        cells.append("-" if b.noise is None else f"±{b.noise:.0%}")
        t.add_row(*cells)
    return t


def plan_table(profile: Profile, source: str) -> Table:
    """What a profile will send: buckets in run order, request kinds, requests per round."""
    from llmwarm.corpus import kinds, requests_per_round, requests_per_sweep

    rule = profile.convergence
    t = Table(title=f"warm-up plan of {source}", title_justify="left")
    for column in ("bucket", "prompt", "concurrency", "max_tokens", "priority", "kinds",
                   "requests/round", "tokens/round", "sweep"):  # fmt: skip
        t.add_column(column, justify="left" if column in ("bucket", "kinds") else "right")
    low = high = 0
    for b in profile.buckets:
        per_round, per_sweep = requests_per_round(profile, b), requests_per_sweep(profile, b)
        sweeps = per_sweep * (2 if profile.check else 1)  # and the check, if asked
        low += per_round * rule.earliest + sweeps
        high += per_round * rule.max_rounds + sweeps
        names = [str(k) for k in kinds(profile, b)]
        shown = ", ".join(names) if len(names) <= 4 else f"{len(names)}: {', '.join(names[:3])} …"
        t.add_row(
            b.name, str(b.prompt_tokens), str(b.concurrency), str(b.max_tokens), str(b.priority),
            shown, str(per_round), str(per_round * (b.prompt_tokens + b.max_tokens)),
            str(sweeps or "-"),
        )  # fmt: skip
    if profile.auto is not None:
        t.add_row("auto", "…", "…", str(profile.auto.max_tokens), "", "resolved against an "
                  "engine: pass --model", "", "", "")  # fmt: skip
    t.caption = (
        f"{low}–{high} requests ({rule.earliest}–{rule.max_rounds} rounds a "
        f"bucket, until {rule.metric} converges); features: "
        f"{', '.join(map(str, profile.features.features()))}"
        f" on {', '.join(sorted(profile.feature_buckets())) or '-'}, each kind sent at once after "
        "round 1"
        + (" and again after the last round (the check: features x2)" if profile.check else "")
    )
    return t


def kinds_table(report: Report) -> Table:
    """Cold (round 1) against warm end-to-end latency per request kind, in milliseconds."""
    t = Table(title="per request kind (all buckets): end-to-end latency", title_justify="left")
    t.add_column("kind")
    t.add_column("e2e cold", justify="right")
    t.add_column("e2e warm", justify="right")
    t.add_column("cold/warm", justify="right")
    for k in report.kinds:
        t.add_row(
            str(k.kind), _ms(k.cold_e2e_s), _ms(k.warm_e2e_s), _ratio(k.cold_e2e_s, k.warm_e2e_s)
        )
    return t


def plot(report: Report, path: Path, option: str = "--plot") -> None:
    """Latency per round per bucket (TTFT, TPOT), the converged round marked; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for ax, (metric, label) in zip(
        axes, (("ttft", "time to first token"), ("tpot", "time per output token")), strict=True
    ):
        for b in report.buckets:
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
    axes[0].legend(fontsize="small")
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
