"""The `llmwarm` command line: maps options onto settings and renders every error.

Exit codes are the constants of `llmwarm.errors`; `EXIT_CODES_HELP` shows them in `--help`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from llmwarm import __version__, files
from llmwarm.errors import EXIT_INTERRUPTED, LlmwarmError, UsageError, render

if TYPE_CHECKING:
    from llmwarm.serve.settings import Mode

err = Console(stderr=True)

app = typer.Typer(
    name="llmwarm",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="markdown",
)

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 2 bad input; 3 the engine could not start; 4 the warm-up failed "
    "(the engine died before the gate opened included); 5 serving ended unasked (the engine "
    "died after it opened, or the HTTP server stopped); 6 not converged "
    "with --on-unconverged fail; 7 (bench) the server cannot be reached; 130 interrupted "
    "before ready."
)

# MODEL and every `vllm serve` flag are handed, untouched, to vLLM's own parser.
PASSTHROUGH = {
    "allow_extra_args": True,
    "ignore_unknown_options": True,
    "help_option_names": ["-h", "--help"],
}

ProfileOption = Annotated[
    Path | None,
    typer.Option(
        "--profile",
        envvar="LLMWARM_PROFILE",
        help="Warm-up profile (YAML). Default: the shipped configs/default.yaml.",
        exists=True,
        dir_okay=False,
        show_default=False,
    ),
]
VllmHelpOption = Annotated[
    bool, typer.Option("--vllm-help", help="Show every vLLM flag that passes through, and exit.")
]


def _print_error(exc: LlmwarmError, prefix: str = "[bold red]Error:[/] ") -> None:
    """One error as the CLI shows it: its message, then a `• where: message` line each."""
    first, *lines = render(exc.message, exc.problems)
    err.print(f"{prefix}{escape(first)}", highlight=False, soft_wrap=True)
    for line in lines:
        err.print(line, highlight=False, soft_wrap=True, markup=False)


def _exit_with(exc: LlmwarmError) -> NoReturn:
    _print_error(exc)
    raise typer.Exit(code=exc.exit_code) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmwarm {__version__}")
        raise typer.Exit()


@app.callback(epilog=EXIT_CODES_HELP)
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Serve vLLM warm: a measured warm-up through the real OpenAI path before user traffic."""


def _configure_logging() -> None:
    # llmwarm's own logger only: vLLM configures (and formats) its loggers itself.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [llmwarm] %(message)s"))
    logger = logging.getLogger("llmwarm")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _run(ctx: typer.Context, *, mode: Mode, vllm_help: bool, **options: Any) -> None:
    # Imported here so `--help`, `--version` and profile errors never wait on vLLM.
    from llmwarm.backend import engine, vllm_args
    from llmwarm.serve import server, settings

    prog = f"llmwarm {ctx.info_name}"
    _configure_logging()
    server.interrupt_on_signals()  # until the event loop's handlers take over
    try:
        if vllm_help:
            typer.echo(vllm_args.vllm_help(prog))
            return
        resolved = settings.resolve(ctx.args, mode=mode, prog=prog, **options)
        try:
            if vllm_args.headless(resolved.vllm_args):
                engine.run_headless(resolved.vllm_args)
            else:
                server.run_sync(resolved)
        finally:
            if resolved.cache is not None:
                resolved.cache.close()
    except LlmwarmError as exc:
        _exit_with(exc)
    except KeyboardInterrupt:  # before the event loop (and its signal handlers) ran
        err.print("Interrupted.")
        raise typer.Exit(code=EXIT_INTERRUPTED) from None


ReportOption = Annotated[
    Path | None,
    typer.Option(
        "--report",
        envvar="LLMWARM_REPORT",
        help="Write the warm-up report (JSON) here.",
        dir_okay=False,
    ),
]
PlotOption = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        envvar="LLMWARM_PLOT",
        help="Also draw latency per round per bucket, converged rounds marked (PNG).",
        dir_okay=False,
    ),
]
CacheDirOption = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        envvar="LLMWARM_CACHE_DIR",
        help="vLLM's compile caches (torch.compile/AOT, inductor, Triton, FlashInfer, CUDA "
        "JIT), baked once by `bake`: `serve` and `warm` start from a copy of them (in TMPDIR; "
        "the directory may be read-only, and a fleet may share it) and publish theirs into it "
        "when nothing matching is there. Created if missing.",
        file_okay=False,
        show_default=False,
    ),
]
LearnOption = Annotated[
    Path | None,
    typer.Option(
        "--learn",
        envvar="LLMWARM_LEARN",
        help="Keep a summary of the request shapes served here (counts, lengths, features; "
        "never text), written from time to time and at shutdown; each start warms the shapes "
        "in it that the profile misses. A directory (a fleet's): a file per process, named "
        "after its host, every one read at start (those of processes gone merged first). "
        "Default: learned/ in a writable --cache-dir.",
        show_default=False,
    ),
]
OnUnconvergedOption = Annotated[
    Literal["serve", "fail"],
    typer.Option(
        "--on-unconverged",
        envvar="LLMWARM_ON_UNCONVERGED",
        help="If a bucket has not converged by max_rounds or the budget: `serve` anyway (a "
        "warning, and the report says so) or `fail` (exit 6, after writing the report).",
    ),
]

CaptureSizesOption = Annotated[
    bool,
    typer.Option(
        "--capture-sizes-from-profile",
        envvar="LLMWARM_CAPTURE_SIZES_FROM_PROFILE",
        help="GPU: give vLLM at most 51 --cudagraph-capture-sizes, in tokens, for the steps the "
        "profile (and the learn file) warms (decode: concurrency x (1 + speculative tokens); "
        "prefill: concurrency x prompt, up to --max-num-batched-tokens), so no warmed step runs "
        "without a graph and others pad little. Conflicts with --cudagraph-capture-sizes, "
        "--max-cudagraph-capture-size and --enforce-eager.",
    ),
]

AdminKeyOption = Annotated[
    str | None,
    typer.Option(
        "--admin-key",
        envvar="LLMWARM_ADMIN_KEY",
        help="serve: the bearer token `POST /warmup/run` needs (give it from a secret through "
        "the variable). Without one, re-warms are taken only over a Unix socket (--uds), "
        "never over TCP: a port-forward, a tunnel or a sidecar proxy looks local there.",
        show_default=False,
    ),
]
RewarmIntervalOption = Annotated[
    float,
    typer.Option(
        "--rewarm-min-interval",
        envvar="LLMWARM_REWARM_MIN_INTERVAL",
        min=0,
        help="serve: seconds from the end of one re-warm before `POST /warmup/run` starts the "
        "next (429 with Retry-After sooner).",
    ),
]

SERVE_HELP = """Start vLLM, warm it up, then serve: `llmwarm serve MODEL [vllm serve flags]`.

The port answers 503 with Retry-After (`/health`, `/ready`, `/v1/*`) until the warm-up is done;
then the same warm engine serves vLLM's OpenAI-compatible API, and `/ready` is 200. MODEL and
every `vllm serve` flag pass through to vLLM unchanged (see `--vllm-help`).
"""

WARM_HELP = """Start vLLM, warm it up, write the report and exit: `llmwarm warm MODEL [vllm flags]`.

For CI, image builds and benchmarks: the warm-up talks to a private loopback port.
"""

BAKE_HELP = """Warm up into a compile-cache directory and exit: `llmwarm bake MODEL [vllm
flags] --cache-dir DIR`.

vLLM's compile caches for this model and these flags land in DIR (with `llmwarm-bake.json`,
what was baked); `llmwarm serve MODEL [the same flags] --cache-dir DIR` then starts from them,
e.g. from an image layer or a volume.
"""

ENV_HELP = (
    "Environment: LLMWARM_PROFILE, LLMWARM_REPORT, LLMWARM_PLOT, LLMWARM_ON_UNCONVERGED, "
    "LLMWARM_CACHE_DIR, LLMWARM_LEARN, LLMWARM_CAPTURE_SIZES_FROM_PROFILE, LLMWARM_ADMIN_KEY, "
    "LLMWARM_REWARM_MIN_INTERVAL set the options of the same name; a flag wins over its "
    "variable."
)


def _command(mode: Mode) -> Callable[..., None]:
    # One parameter list for every command that runs an engine; they differ only in the mode.
    def command(
        ctx: typer.Context,
        profile: ProfileOption = None,
        report: ReportOption = Path("llmwarm-report.json"),
        plot: PlotOption = None,
        on_unconverged: OnUnconvergedOption = "serve",
        capture_sizes_from_profile: CaptureSizesOption = False,
        cache_dir: CacheDirOption = None,
        learn: LearnOption = None,
        admin_key: AdminKeyOption = None,
        rewarm_min_interval: RewarmIntervalOption = 30.0,
        vllm_help: VllmHelpOption = False,
    ) -> None:
        _run(
            ctx,
            mode=mode,
            vllm_help=vllm_help,
            profile_path=profile,
            report_path=report,
            plot_path=plot,
            on_unconverged=on_unconverged,
            capture_sizes_from_profile=capture_sizes_from_profile,
            cache_dir=cache_dir,
            learn_path=learn,
            admin_key=admin_key,
            rewarm_interval_s=rewarm_min_interval,
        )

    return command


MODES: tuple[tuple[Mode, str], ...] = (
    ("serve", SERVE_HELP),
    ("warm", WARM_HELP),
    ("bake", BAKE_HELP),
)
for _mode, _help in MODES:
    app.command(
        _mode,
        help=_help,
        context_settings=PASSTHROUGH,
        epilog=f"{ENV_HELP}\n\n{EXIT_CODES_HELP}",
        options_metavar="MODEL [OPTIONS] [VLLM FLAGS]",
    )(_command(_mode))


@app.command("bench", epilog=EXIT_CODES_HELP)
def bench_command(
    url: Annotated[str, typer.Argument(help="Base URL of an OpenAI-compatible server.")],
    model: Annotated[
        str | None, typer.Option(help="Model name to request (default: the first listed).")
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(
            "--profile",
            help="Probe profile (default: the shipped configs/probe.yaml).",
            exists=True,
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Steady requests per kind.")] = 5,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write every number here.", dir_okay=False)
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="OPENAI_API_KEY", help="Bearer token, if any.")
    ] = None,
    forms: Annotated[
        str,
        typer.Option(
            "--forms",
            help="Prompt forms to send at every bucket besides text, comma-separated: "
            "token_ids, prompt_batch (completions only); `none` for text alone.",
        ),
    ] = "token_ids",
) -> None:
    """Measure a server's cold-start penalty: each request kind's first request against its
    steady latency. Run it the moment the server is ready. Works against any OpenAI-compatible
    server; kinds it refuses are reported, not fatal."""
    import asyncio

    from llmwarm import bench
    from llmwarm.model.profile import load_profile, shipped
    from llmwarm.serve.settings import check_output_path

    try:
        check_output_path(json_out, "--json")
        chosen = bench.prompt_forms(forms)
        probe = load_profile(profile or shipped("probe"))
        report = asyncio.run(
            bench.probe(
                url, profile=probe, repeats=repeats, model=model, api_key=api_key, forms=chosen
            )
        )
    except LlmwarmError as exc:
        _exit_with(exc)
    Console(width=160).print(bench.table(report))
    if json_out is not None:
        try:
            files.write_text(json_out, report.model_dump_json(indent=2) + "\n", "--json")
        except LlmwarmError as exc:
            _exit_with(exc)


profile_app = typer.Typer(
    help="Check, show and describe warm-up profiles.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(profile_app, name="profile")


@profile_app.command("check")
def profile_check(
    files: Annotated[list[Path], typer.Argument(help="Profiles to check.", show_default=False)],
) -> None:
    """Validate profiles: exit 0, or exit 2 with one line per problem naming the field."""
    from llmwarm.model.profile import load_profile

    failed: list[LlmwarmError] = []
    for file in files:
        try:
            profile = load_profile(file)
        except LlmwarmError as exc:
            failed.append(exc)
            _print_error(exc, prefix=f"[red]✗[/] {escape(str(file))}: ")
            continue
        n = len(profile.buckets)
        auto = " + auto" if profile.auto else ""
        typer.echo(f"✓ {file}: {n} bucket{'' if n == 1 else 's'}{auto}")
    if failed:
        raise typer.Exit(code=max(exc.exit_code for exc in failed))


@profile_app.command("show", context_settings=PASSTHROUGH)
def profile_show(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="The profile.", exists=True, dir_okay=False)],
    model: Annotated[
        str | None,
        typer.Option(
            help="Resolve `auto` and check limits against this model's engine config "
            "(with any vLLM flags after it); no engine is started."
        ),
    ] = None,
) -> None:
    """Show the expanded plan: buckets in run order, request kinds, request counts."""
    from llmwarm.model.fit import for_engine
    from llmwarm.model.profile import load_profile
    from llmwarm.serve.display import plan_table

    try:
        profile = load_profile(file)
        if model is not None:
            from llmwarm.backend import engine, vllm_args
            from llmwarm.serve import settings

            args = vllm_args.parse_args([model, *ctx.args], "llmwarm profile show")
            settings.check_model(args.model)
            profile = for_engine(profile, engine.shape_from_args(args))
        elif ctx.args:
            raise UsageError(
                "vLLM flags need --model", problems=[("--model", f"given {' '.join(ctx.args)}")]
            )
    except LlmwarmError as exc:
        _exit_with(exc)
    Console().print(plan_table(profile, str(file)))


ShareOption = Annotated[
    float,
    typer.Option(
        "--coverage", min=0.01, max=1.0, help="Share of the requests the buckets must cover."
    ),
]
OutOption = Annotated[
    Path | None,
    typer.Option("--out", help="Write the profile here instead of stdout.", dir_okay=False),
]


@profile_app.command("from-log")
def profile_from_log(
    file: Annotated[
        Path,
        typer.Argument(
            help="OpenAI request bodies (JSONL) and/or vLLM request log lines "
            "(--enable-log-requests; --log-level DEBUG adds prompt lengths).",
            exists=True,
            dir_okay=False,
        ),
    ],
    coverage: ShareOption = 0.99,
    out: OutOption = None,
) -> None:
    """Build a profile from real traffic: buckets and features that cover its requests."""
    from llmwarm.traffic.fromlog import build

    def built() -> tuple[dict[str, Any], str]:
        lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
        return build(lines, coverage, str(file))

    _print_profile(built, out)


def _print_profile(built: Callable[[], tuple[dict[str, Any], str]], out: Path | None) -> None:
    """A profile `built` (its data, its comment), checked to load, the comment first, to
    stdout or `out`."""
    import yaml

    from llmwarm.model.profile import parse_profile

    try:
        data, comment = built()
        parse_profile(data, source="the built profile")  # what we print must load
    except LlmwarmError as exc:
        _exit_with(exc)
    text = comment + "\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    if out is None:
        typer.echo(text, nl=False)
    else:
        try:
            files.write_text(out, text, "--out")
        except LlmwarmError as exc:
            _exit_with(exc)
        err.print(comment, highlight=False, markup=False)


@profile_app.command("from-coverage")
def profile_from_coverage(
    learn_files: Annotated[
        list[Path],
        typer.Argument(
            help="Learn files (--learn) of one or many replicas: merged.",
            exists=True,
            dir_okay=False,
            show_default=False,
        ),
    ],
    coverage: ShareOption = 0.99,
    out: OutOption = None,
) -> None:
    """Build one profile from the learn files of a fleet: the shapes its traffic had."""
    from llmwarm.traffic import learn

    def built() -> tuple[dict[str, Any], str]:
        counts = learn.read_many(learn_files)
        return learn.profile_from(counts, coverage, [str(f) for f in learn_files])

    _print_profile(built, out)


@profile_app.command("schema")
def profile_schema() -> None:
    """Print the JSON Schema of the profile format (for editors)."""
    import json

    from llmwarm.model.profile import Profile

    typer.echo(json.dumps(Profile.model_json_schema(), indent=2))


def main() -> None:
    app()
