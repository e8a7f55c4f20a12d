"""The vLLM adapter's command line: MODEL and every `vllm serve` flag, parsed by vLLM's own
parser and checks; the modes llmwarm does not run, refused naming their flag; and the
arguments llmwarm adds for its own sake (the JIT-monitor counter)."""

from __future__ import annotations

import logging
from argparse import Namespace
from typing import Any, Literal, NoReturn

from llmwarm.backend import jitmon
from llmwarm.errors import VllmArgsError

logger = logging.getLogger(__name__)


def _parser(prog: str) -> Any:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(FlexibleArgumentParser):  # type: ignore[misc]
        # argparse would print and sys.exit(2); llmwarm renders errors in its CLI instead.
        def error(self, message: str) -> NoReturn:
            flag, _, detail = message.partition(": ")
            if flag.startswith("argument "):  # "argument --max-model-len: invalid ..."
                problem = (flag.removeprefix("argument ").split("/")[0], detail)
            else:
                problem = ("vllm flags", message)
            raise VllmArgsError("bad vLLM arguments", problems=[problem])

    return make_arg_parser(Parser(prog=prog, description="vLLM flags accepted by llmwarm"))


def vllm_help(prog: str) -> str:
    """vLLM's own help for every flag `llmwarm serve` passes through."""
    return str(_parser(prog).format_help())


def parse_args(argv: list[str], prog: str) -> Namespace:
    """Parse `MODEL [vllm serve flags]` with vLLM's own parser and checks."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    cli_env_setup()
    args: Namespace = _parser(prog).parse_args(argv)
    if args.model_tag is not None:
        args.model = args.model_tag
    elif not any(a == "--model" or a.startswith("--model=") for a in argv):
        # vLLM would quietly fetch its default model; llmwarm serves what it is told to
        raise VllmArgsError(
            "no model given", problems=[("MODEL", "missing: llmwarm serve MODEL [vllm flags]")]
        )
    try:
        validate_parsed_serve_args(args)
    except (ValueError, TypeError, KeyError) as exc:
        raise VllmArgsError(
            "bad vLLM arguments", problems=[("vllm flags", str(exc).removeprefix("Error: "))]
        ) from None
    _refuse_unsupported(args)
    return args


_ONE_SERVER = (
    "llmwarm runs one in-process API server in front of the engine (under data parallelism "
    "it fronts every rank and warms each in turn)"
)
_PER_NODE = (
    "with an API server per node in front of that node's ranks (hybrid load balancing), vLLM "
    "routes a pinned request by its index among the node's engines, not by its rank; use "
    "--data-parallel-size N with --headless secondary nodes (one server warms every rank), or "
    "--data-parallel-external-lb with one llmwarm per rank"
)


def _refuse_unsupported(args: Namespace) -> None:
    """The `vllm serve` modes llmwarm does not run, each refused naming its flag.

    Data parallelism runs: one API server in front of every rank (vLLM's internal load
    balancer, `--data-parallel-size N`, ranks on this node or `--headless` ones), one per rank
    (`--data-parallel-external-lb` / `--data-parallel-rank`), and `--headless` nodes.
    """
    from vllm import envs

    headless = bool(args.headless)
    start_rank = getattr(args, "data_parallel_start_rank", None) is not None
    for flag, unsupported, why in (
        ("--grpc", getattr(args, "grpc", False), _ONE_SERVER),
        ("--api-server-count", args.api_server_count not in (None, 0 if headless else 1),
         _ONE_SERVER),
        ("VLLM_USE_RUST_FRONTEND", envs.VLLM_USE_RUST_FRONTEND, _ONE_SERVER),
        ("--data-parallel-multi-port-external-lb",
         getattr(args, "data_parallel_multi_port_external_lb", False), _ONE_SERVER),
        ("--data-parallel-hybrid-lb", args.data_parallel_hybrid_lb, _PER_NODE),
        ("--data-parallel-start-rank", start_rank and not headless, _PER_NODE),
    ):  # fmt: skip
        if unsupported:
            raise VllmArgsError(f"{flag} is not supported by llmwarm", problems=[(flag, why)])


def headless(args: Namespace) -> bool:
    """A secondary node: vLLM's engines and no API server (nothing to warm or gate here)."""
    return bool(args.headless)


def model_name(args: Namespace) -> str:
    """The name clients use in the `model` field."""
    return str(args.served_model_name[0] if args.served_model_name else args.model)


def served_names(args: Namespace) -> list[str]:
    """Every name the base model answers to (any other `model` is an adapter)."""
    return [str(n) for n in args.served_model_name] if args.served_model_name else [args.model]


def cudagraph_steps(args: Namespace) -> Literal["none", "decode", "all"]:
    """Which steps the CUDA-graph mode asked for runs on graphs (`-cc.cudagraph_mode`; vLLM's
    default, FULL_AND_PIECEWISE, when not given): none, uniform decode steps only (e.g.
    FULL_DECODE_ONLY), or mixed steps too."""
    mode = args.compilation_config.cudagraph_mode
    if mode is None:
        return "all"
    if not mode:
        return "none"
    return "all" if mode.mixed_mode() else "decode"


def count_jit_events(args: Namespace) -> bool:
    """Give vLLM llmwarm's JIT-monitor counter as `--worker-extension-cls` (it counts events
    by llmwarm's phase; not part of vLLM's config hash), where every worker can load it:
    an engine on this node alone. Workers on other nodes (`--nnodes`, a Ray cluster) may not
    have llmwarm installed, and vLLM would fail where plain vLLM starts: there the counter is
    off unless the user passes it, and the log says how. Whether it was given."""
    if args.worker_extension_cls:
        return False  # the user's own (or llmwarm's, given on purpose)
    dp_size = args.data_parallel_size or 1
    remote_ranks = (  # one server in front of ranks on --headless nodes
        not (args.data_parallel_external_lb or args.data_parallel_rank is not None)
        and (args.data_parallel_size_local or dp_size) < dp_size
    )
    multi_node = (
        (args.nnodes or 1) > 1
        or args.distributed_executor_backend == "ray"
        or args.data_parallel_backend == "ray"
        or remote_ranks
    )
    if multi_node:
        logger.info(
            "vLLM JIT-monitor counting is off: workers on other nodes may not have llmwarm; "
            "pass --worker-extension-cls %s where every node has it", jitmon.QUALNAME,
        )  # fmt: skip
        return False
    args.worker_extension_cls = jitmon.QUALNAME
    return True
