"""Bad input: a clear message naming the field or flag, exit 2, never a traceback."""

from __future__ import annotations

import gc
import json
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any, Literal

import pytest
from typer.testing import CliRunner

from benchmarks.launch import ENGINE_FLAGS, LLMWARM, free_port
from llmwarm import __version__
from llmwarm.cli import app
from tests.conftest import invoke
from tests.fakes import MINIMAL_PROFILE
from tests.launch import engine_env


def test_version() -> None:
    assert invoke("--version") == (0, f"llmwarm {__version__}\n")


def test_help_documents_exit_codes() -> None:
    code, out = invoke("serve", "--help")
    assert code == 0
    assert "MODEL" in out and "--profile" in out and "130" in out


def test_missing_profile_file(tmp_path: Path) -> None:
    code, out = invoke("serve", "some/model", "--profile", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert "--profile" in out and "does not exist" in out


def test_malformed_profile_names_each_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("buckets:\n  - {prompt_tokens: 0, concurrency: 1, max_tokens: x}\nroundz: 1\n")
    code, out = invoke("warm", "some/model", "--profile", str(bad))
    assert code == 2
    assert "• buckets.0.prompt_tokens: Input should be greater than 0 (got 0)" in out
    assert "• buckets.0.max_tokens:" in out and "(got 'x')" in out
    assert "• roundz: Extra inputs are not permitted" in out


def test_report_into_missing_directory(tmp_path: Path) -> None:
    code, out = invoke("warm", "m", "--report", str(tmp_path / "no" / "r.json"))
    assert code == 2 and "--report" in out


# Bad command lines (on top of the profile suite): each names the flag (or variable) at fault,
# exits 2, and prints no traceback. {model} is the tiny model, {tmp} a scratch directory.
BAD_COMMAND_LINES = [
    ("no model", ["serve"], {}, "• MODEL: missing"),
    ("unknown vLLM flag", ["serve", "{model}", "--bogus-flag", "1"],
     {}, "unrecognized arguments: --bogus-flag"),
    ("typo of an llmwarm flag", ["serve", "{model}", "--profle", "x.yaml"],
     {}, "unrecognized arguments: --profle"),
    ("bad vLLM value", ["serve", "{model}", "--max-model-len", "lots"], {}, "• --max-model-len"),
    ("bad vLLM choice", ["serve", "{model}", "--dtype", "float7"], {}, "• --dtype"),
    ("bad port", ["serve", "{model}", "--port", "http"], {}, "• --port"),
    ("headless, not serving", ["warm", "{model}", "--headless"],
     {}, "• --headless: use llmwarm serve --headless, not llmwarm warm"),
    ("several API servers", ["serve", "{model}", "--api-server-count", "2"],
     {}, "--api-server-count is not supported"),
    ("no API server", ["serve", "{model}", "--api-server-count", "0"],
     {}, "--api-server-count is not supported"),
    ("the Rust frontend", ["serve", "{model}"], {"VLLM_USE_RUST_FRONTEND": "1"},
     "• VLLM_USE_RUST_FRONTEND: llmwarm runs one in-process API server"),
    ("several API servers in front of a headless node", ["serve", "{model}", "--headless",
     "--api-server-count", "1"], {}, "--api-server-count"),
    ("data parallel, multi-port",
     ["serve", "{model}", "--data-parallel-size", "2", "--data-parallel-size-local", "2",
      "--data-parallel-multi-port-external-lb"],
     {}, "• --data-parallel-multi-port-external-lb: llmwarm runs one in-process API server"),
    ("data parallel, hybrid LB", ["serve", "{model}", "--data-parallel-hybrid-lb"],
     {}, "• --data-parallel-hybrid-lb: with an API server per node"),
    ("data parallel, a node's API server", ["serve", "{model}", "--data-parallel-size", "4",
     "--data-parallel-size-local", "2", "--data-parallel-start-rank", "2"],
     {}, "• --data-parallel-start-rank: with an API server per node"),
    ("unknown policy", ["serve", "{model}", "--on-unconverged", "maybe"],
     {}, "Invalid value for '--on-unconverged'"),
    ("unknown policy from the environment", ["serve", "{model}"],
     {"LLMWARM_ON_UNCONVERGED": "maybe"}, "(env var: 'LLMWARM_ON_UNCONVERGED')"),
    ("missing profile from the environment", ["warm", "{model}"],
     {"LLMWARM_PROFILE": "{tmp}/nope.yaml"}, "(env var: 'LLMWARM_PROFILE')"),
    ("plot not a PNG", ["warm", "{model}", "--plot", "{tmp}/plot.txt"], {}, "• --plot"),
    ("plot is a directory", ["warm", "{model}", "--plot", "{tmp}"], {}, "'--plot'"),
    ("report into a missing directory", ["warm", "{model}", "--report", "{tmp}/no/r.json"],
     {}, "• --report"),
    ("bake without a cache directory", ["bake", "{model}"], {}, "• --cache-dir: missing"),
    ("cache directory is a file", ["serve", "{model}", "--cache-dir", "{tmp}/file"],
     {}, "'--cache-dir'"),
    ("cache directory from the environment is a file", ["bake", "{model}"],
     {"LLMWARM_CACHE_DIR": "{tmp}/file"}, "(env var: 'LLMWARM_CACHE_DIR')"),
    ("two sources of capture sizes",
     ["serve", "{model}", "--capture-sizes-from-profile", "--cudagraph-capture-sizes", "1", "2"],
     {}, "• --capture-sizes-from-profile: conflicts with --cudagraph-capture-sizes"),
    ("capture sizes and a capture ceiling",
     ["serve", "{model}", "--capture-sizes-from-profile", "--max-cudagraph-capture-size", "8"],
     {}, "• --capture-sizes-from-profile: conflicts with --max-cudagraph-capture-size"),
    ("capture sizes without graphs",
     ["serve", "{model}", "--capture-sizes-from-profile", "--enforce-eager"],
     {}, "• --capture-sizes-from-profile: conflicts with --enforce-eager"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [line[1:] for line in BAD_COMMAND_LINES],
    ids=[line[0] for line in BAD_COMMAND_LINES],
)
def test_bad_command_lines(
    tiny_model: Path, tmp_path: Path, argv: list[str], env: dict[str, str], says: str
) -> None:
    (tmp_path / "file").write_text("not a directory")

    def fill(text: str) -> str:
        return text.format(model=tiny_model, tmp=tmp_path)

    result = CliRunner(
        env={"COLUMNS": "300", "NO_COLOR": "1"} | {k: fill(v) for k, v in env.items()}
    ).invoke(app, [fill(a) for a in argv])
    assert isinstance(result.exception, SystemExit | None), result.exception  # no traceback
    assert result.exit_code == 2, result.output
    assert says in result.output, result.output


@pytest.mark.parametrize("model", ["/no/such/model", "./not-here"])
def test_missing_model_directory(model: str) -> None:
    code, out = invoke("serve", model)
    assert code == 2
    assert "• MODEL:" in out and model in out


def test_vllm_help_lists_vllm_flags() -> None:
    code, out = invoke("serve", "--vllm-help")
    assert code == 0
    assert "--max-model-len" in out and "--tensor-parallel-size" in out


def test_port_in_use_fails_before_the_engine_loads(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In-process (a subprocess would import vLLM again: 10 s of the fast lane): an engine that
    # started would fail the test here instead of starting
    from llmwarm import lifeline

    def started() -> None:  # the first thing an engine's start does
        raise AssertionError("an engine started before the port was checked")

    monkeypatch.setattr(lifeline, "arm", started)

    def open_sockets() -> dict[int, socket.socket]:
        return {id(o): o for o in gc.get_objects() if type(o) is socket.socket and o.fileno() >= 0}

    before = open_sockets()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out = invoke("serve", str(tiny_model), "--host", "127.0.0.1", "--port", str(port))
    assert code == 2, out  # (invoke: no traceback, an uncaught exception fails it)
    assert f"127.0.0.1:{port} is already in use" in out
    # and the socket the failed bind made is closed, not left open until a garbage collection
    # (vLLM's `create_server_socket` leaves it open: the exception's frames hold it)
    leaked = [o for key, o in open_sockets().items() if key not in before]
    assert not leaked, leaked


@pytest.mark.e2e  # starts the real engine (which fails)
def test_an_unloadable_model_is_a_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    # config.json and tokenizer of a real model, weights that are not a checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    port = free_port()
    proc = subprocess.run(
        [*LLMWARM, "serve", str(broken), *ENGINE_FLAGS, "--host", "127.0.0.1",
         "--port", str(port)],
        capture_output=True, text=True, timeout=300, env=engine_env(),
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Error: the vLLM engine failed to start" in proc.stderr
    assert "\n  • engine: " in proc.stderr


# --- llmwarm profile ... ------------------------------------------------------------------

B = "buckets: [{prompt_tokens: 8, concurrency: 1, max_tokens: 4}]\n"

MALFORMED = [
    ("wrong type", "buckets: [{prompt_tokens: many, concurrency: 1, max_tokens: 4}]",
     "buckets.0.prompt_tokens"),
    ("zero size", "buckets: [{prompt_tokens: 0, concurrency: 1, max_tokens: 4}]",
     "buckets.0.prompt_tokens"),
    ("negative concurrency", "buckets: [{prompt_tokens: 8, concurrency: -1, max_tokens: 4}]",
     "buckets.0.concurrency"),
    ("zero output", "buckets: [{prompt_tokens: 8, concurrency: 1, max_tokens: 0}]",
     "buckets.0.max_tokens"),
    ("missing size", "buckets: [{prompt_tokens: 8, concurrency: 1}]", "buckets.0.max_tokens"),
    ("unknown bucket key", "buckets: [{prompt_tokens: 8, concurrency: 1, max_tokens: 4, x: 1}]",
     "buckets.0.x"),
    ("unknown top key", B + "warmup: fast", "warmup"),
    ("not a mapping", "- a\n- b", "expected a mapping"),
    ("empty file", "", "expected a mapping, got NoneType"),
    ("bad yaml", "buckets: [", "not valid YAML"),
    ("empty grid list", "grid: {prompt_tokens: [], concurrency: [1], max_tokens: [4]}",
     "grid.prompt_tokens"),
    ("no buckets at all", "endpoints: [chat]", "no buckets"),
    ("duplicate names", "buckets: [{prompt_tokens: 8, concurrency: 1, max_tokens: 4}, "
     "{prompt_tokens: 8, concurrency: 1, max_tokens: 4}]", "buckets: bucket names must be unique"),
    ("unknown endpoint", B + "endpoints: [telepathy]", "endpoints.0"),
    ("stream not bool", B + "stream: [sometimes]", "stream.0"),
    ("unknown feature", B + "features: {use: [greedy, telepathy]}", "features.use.1"),
    ("invalid json schema", B + "features: {use: [json_schema], json_schema: {type: 3}}",
     "features.json_schema"),
    ("invalid regex", B + "features: {use: [regex], regex: '(a'}", "features.regex"),
    ("feature bucket unknown", B + "features: {buckets: [nope]}", "features: features.buckets"),
    ("lora without adapters", B + "features: {use: [lora]}", "features: `lora` is used"),
    ("n of one", B + "features: {use: [n], n: 1}", "features.n"),
    ("window of one", B + "convergence: {window: 1}", "convergence.window"),
    ("max below min", B + "convergence: {min_rounds: 5, max_rounds: 3}", "convergence: max_rounds"),
    ("unknown metric", B + "convergence: {metric: p99}", "convergence.metric"),
    ("tpot without streaming", B + "stream: [false]", "convergence: metric 'tpot'"),
    ("negative budget", B + "budget: {max_seconds: -5}", "budget.max_seconds"),
    ("zero request budget", B + "budget: {max_requests: 0}", "budget.max_requests"),
    ("auto bad", "auto: {max_tokens: 0}", "auto.max_tokens"),
    ("missing prompts file", B + "prompts: {file: nope.txt}", "prompts.file"),
    ("seed not int", B + "seed: abc", "seed"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "where"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_profile_check_rejects_malformed(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, out = invoke("profile", "check", str(path))
    assert code == 2, out
    assert where in out
    assert "Traceback" not in out


def test_profile_check_cyclic_extends_and_unreadable(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    code, out = invoke("profile", "check", str(tmp_path / "a.yaml"), str(tmp_path / "none.yaml"))
    assert code == 2
    assert "cyclic extends" in out and "none.yaml: cannot read profile" in out


def test_profile_check_accepts_the_shipped_profiles() -> None:
    shipped = sorted((Path(__file__).parent.parent / "llmwarm" / "configs").glob("*.yaml"))
    code, out = invoke("profile", "check", *map(str, shipped))
    assert code == 0, out
    assert out.count("✓") == len(shipped) == 6


def test_profile_show_plan() -> None:
    code, out = invoke("profile", "show", "configs/default.yaml")
    assert code == 0, out
    assert "p16-c1-o8" in out and "req/round" in out
    assert "features: greedy, sampling" in out
    assert "after round 1" in out and "after the last round" not in out  # no check by default
    narrow = CliRunner(env={"COLUMNS": "80", "NO_COLOR": "1"})  # a terminal 80 columns wide
    shown = narrow.invoke(app, ["profile", "show", "configs/default.yaml"]).output
    assert "p512-c2-o8" in shown and max(map(len, shown.splitlines())) <= 80, shown
    code, out = invoke("profile", "show", "configs/minimal.yaml")  # CI's: the check on
    assert code == 0, out
    assert "after the last round (the check)" in out


def test_profile_show_resolves_auto_against_the_model(tiny_model: Path) -> None:
    code, out = invoke(
        "profile", "show", "configs/long-context.yaml", "--model", str(tiny_model),
        "--max-model-len", "2048", "--gpu-memory-utilization", "0.5",
    )  # fmt: skip
    assert code == 0, out
    assert "auto-p256-c1-o16" in out and "auto-p1024-c1-o16" in out


def test_profile_show_names_a_bucket_too_long_for_the_model(tiny_model: Path) -> None:
    code, out = invoke(
        "profile", "show", "configs/long-context.yaml", "--model", str(tiny_model),
        "--max-model-len", "512", "--gpu-memory-utilization", "0.5",
    )  # fmt: skip
    assert code == 2
    assert "• buckets.0: p1024-c2-o16: prompt_tokens + max_tokens = 1040" in out


def test_profile_schema_is_json_schema() -> None:
    code, out = invoke("profile", "schema")
    schema = json.loads(out)
    assert code == 0 and schema["title"] == "Profile"
    assert "convergence" in schema["properties"] and "Features" in schema["$defs"]
    assert schema["properties"]["seed"]["description"]


def _gpu_capture_sizes(args: Any) -> tuple[list[int], int]:
    """The capture sizes vLLM ends up with for these args on a GPU: vLLM's own
    `_set_cudagraph_sizes`, run on the configuration as a CUDA platform would leave it (the CPU
    platform switches graphs off and clears the sizes)."""
    from vllm.config import CUDAGraphMode
    from vllm.engine.arg_utils import AsyncEngineArgs

    engine_args = AsyncEngineArgs.from_cli_args(args)
    wanted = engine_args.cudagraph_capture_sizes
    config = engine_args.create_engine_config()
    config.model_config.enforce_eager = False
    compilation = config.compilation_config
    compilation.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    compilation.cudagraph_capture_sizes = wanted
    compilation.max_cudagraph_capture_size = None
    config._set_cudagraph_sizes()
    return list(compilation.cudagraph_capture_sizes), config.scheduler_config.max_num_batched_tokens


def test_capture_sizes_from_profile_are_tokens_covering_every_step_vllm_keeps(
    tmp_path: Path, tiny_model: Path
) -> None:
    from llmwarm.backend import capture
    from llmwarm.serve.settings import resolve

    profile = tmp_path / "wide.yaml"
    profile.write_text(
        "buckets:\n"
        "  - {prompt_tokens: 16, concurrency: 1, max_tokens: 8}\n"
        "  - {prompt_tokens: 16, concurrency: 96, max_tokens: 8}\n"
        "  - {prompt_tokens: 300, concurrency: 3, max_tokens: 8}\n"
    )
    flags = ["--max-num-seqs", "128", "--max-num-batched-tokens", "1024", "--max-model-len", "512"]
    spec = json.dumps({"method": "ngram", "num_speculative_tokens": 3,
                       "prompt_lookup_max": 4, "prompt_lookup_min": 2})  # fmt: skip

    def sizes(*more: str) -> tuple[list[int], list[int], int, Any]:
        settings = resolve(
            [str(tiny_model), *flags, *more], profile_path=profile, report_path=None,
            plot_path=None, on_unconverged="serve", capture_sizes_from_profile=True,
            mode="serve", prog="llmwarm serve",
        )  # fmt: skip
        ours = settings.vllm_args.cudagraph_capture_sizes
        return (ours, *_gpu_capture_sizes(settings.vllm_args), settings.capture)

    ours, kept, budget, given = sizes()
    assert budget == 1024
    # vLLM keeps every size: its graphs are exactly these, and no more than its default count
    assert kept == ours == given.sizes and len(ours) <= capture.MAX_SIZES
    # tokens, not requests: decode steps 1 and 96, a prefill of 16, each exactly: no padding;
    # the prefills of 300, 900 and 1024 tokens (96 x 16 = 1536, capped at
    # max_num_batched_tokens) are past vLLM's default's reach (2 x max_num_seqs = 256 tokens):
    # compute-bound, they run without a graph, unpadded, as with vLLM's default
    assert {1, 96, 16} <= set(ours) and max(ours) == given.ceiling == 256
    assert given.warmed_padding == 0 and given.uncaptured == [300, 900, 1024]
    # llmwarm's model of vLLM's default is vLLM's own
    default, _ = _gpu_capture_sizes(resolve(
        [str(tiny_model), *flags], profile_path=profile, report_path=None, plot_path=None,
        on_unconverged="serve", mode="serve", prog="llmwarm serve",
    ).vllm_args)  # fmt: skip
    assert max(default) == 256 and default == capture.vllm_default(128, 1024)
    assert given.default_count == len(default) and given.default_largest == 256
    # FULL_DECODE_ONLY: no graph above the widest decode step vLLM runs (128 requests, where
    # its default captures to 256), and the prefills are no steps of a graph (none left out:
    # no mixed step has one)
    ours, kept, _, decode = sizes("-cc.cudagraph_mode=FULL_DECODE_ONLY")
    assert max(ours) == decode.ceiling == 128 and decode.uncaptured == [] and kept == ours
    # with 3 speculative tokens a decode step of 96 requests is 96 x 4 = 384 tokens, and every
    # size is a multiple of 4 (vLLM dispatches a uniform decode batch only to such a size)
    ours, kept, _, capture = sizes("--speculative-config", spec)
    assert 384 in ours and 4 in ours and kept == ours
    assert all(size % 4 == 0 for size in ours)


def test_vllms_default_capture_sizes_are_modelled_as_vllm_makes_them(tiny_model: Path) -> None:
    from llmwarm.backend import capture, vllm_args

    for seqs, budget, spec in ((256, 8192, 0), (8, 2048, 0), (256, 8192, 3), (32, 64, 1)):
        flags = ["--max-num-seqs", str(seqs), "--max-num-batched-tokens", str(budget)]
        if spec:
            flags += ["--speculative-config", json.dumps(
                {"method": "ngram", "num_speculative_tokens": spec, "prompt_lookup_max": 4,
                 "prompt_lookup_min": 2})]  # fmt: skip
        args = vllm_args.parse_args([str(tiny_model), "--max-model-len", "512", *flags], "test")
        vllms, _ = _gpu_capture_sizes(args)
        assert capture.vllm_default(seqs, budget, spec) == vllms, (seqs, budget, spec)


def test_capture_sizes_from_profile_conflicts_with_the_vllm_flag(tiny_model: Path) -> None:
    code, out = invoke(
        "serve", str(tiny_model), "--capture-sizes-from-profile",
        "--cudagraph-capture-sizes", "1", "2",
    )  # fmt: skip
    assert code == 2
    assert "--capture-sizes-from-profile: conflicts with --cudagraph-capture-sizes" in out


def test_a_cpu_start_failure_with_several_ranks_says_what_to_bind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from llmwarm.backend.engine import _start_hints

    config = SimpleNamespace(parallel_config=SimpleNamespace(world_size=4))
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    [(where, what)] = _start_hints(config)
    assert where == "VLLM_CPU_OMP_THREADS_BIND" and "'0|1|2|3'" in what
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1|2|3")
    assert _start_hints(config) == []
    assert _start_hints(SimpleNamespace(parallel_config=SimpleNamespace(world_size=1))) == []


def test_the_plan_follows_the_engine_vllm_resolved_not_the_flags(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The defect: llmwarm read `num_speculative_tokens` from --speculative-config's JSON, which
    # vLLM fills itself for MTP and draft models (their n_predict) and suffix decoding; and it
    # modelled vLLM's default sizes at the 512-token ceiling, where data-centre Blackwell's is
    # 1024 and `performance_mode=interactivity` captures every size to 32.
    from llmwarm.backend import capture, engine, vllm_args
    from llmwarm.model.fit import EngineShape
    from llmwarm.model.profile import load_profile
    from llmwarm.serve.settings import apply_capture_sizes

    args = vllm_args.parse_args([str(tiny_model), "--max-model-len", "1024"], "test")
    args.speculative_config = {"method": "mtp"}  # the draft model says how many: 3
    blackwell = [*range(1, 33), *range(40, 256, 8), *range(256, 1025, 16)]
    resolved = EngineShape(
        max_model_len=1024, max_num_seqs=256, max_num_batched_tokens=8192,
        cudagraph_capture_sizes=blackwell, spec_tokens=3,
    )  # fmt: skip
    monkeypatch.setattr(engine, "shape_from_args", lambda args: resolved)
    plan = apply_capture_sizes(args, load_profile(MINIMAL_PROFILE))
    assert all(size % 4 == 0 for size in plan.sizes) and 4 in plan.sizes
    assert plan.default_count == len(blackwell) != len(capture.vllm_default(256, 8192, 3))


def _gpu_config_hash(args: Any) -> str:
    """vLLM's configuration hash (its compile cache's name) as a GPU would compute it: with the
    capture sizes these args give (the CPU platform clears them)."""
    from vllm.config import CUDAGraphMode
    from vllm.engine.arg_utils import AsyncEngineArgs

    engine_args = AsyncEngineArgs.from_cli_args(args)
    config = engine_args.create_engine_config()
    config.compilation_config.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    config.compilation_config.cudagraph_capture_sizes = engine_args.cudagraph_capture_sizes
    return str(config.compute_hash())


def test_a_start_after_learning_keeps_the_sizes_its_baked_cache_was_compiled_for(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The defect: the sizes followed the learn files, which change with traffic; they are
    # part of vLLM's configuration hash, which names the compile cache: the next start missed
    # the baked cache, compiled again, and `publish` declined to replace the bake.
    from collections import Counter

    from llmwarm.backend import caches
    from llmwarm.model.kinds import Kind
    from llmwarm.serve.settings import resolve
    from llmwarm.traffic import learn
    from llmwarm.traffic.coverage import Shape

    monkeypatch.setattr(caches, "use", lambda directory: None)  # no environment to undo
    cache_dir, learned = tmp_path / "cache", tmp_path / "learned.json"
    learn.write(learned, Counter({Shape(Kind("completions"), 64, 4, 16): 10}), "tiny")

    def start(mode: Literal["serve", "bake"]) -> Any:
        return resolve(
            [str(tiny_model), "--max-model-len", "1024", "--served-model-name", "tiny"],
            profile_path=MINIMAL_PROFILE, report_path=None, plot_path=None,
            on_unconverged="serve", capture_sizes_from_profile=True, cache_dir=cache_dir,
            learn_path=learned, mode=mode, prog=f"llmwarm {mode}",
        )  # fmt: skip

    bake = start("bake")
    assert bake.capture is not None and bake.cache is not None
    baked_hash = _gpu_config_hash(bake.vllm_args)
    caches.write_manifest(cache_dir, caches.Manifest(
        llmwarm_version="x", vllm_version="0.32.0", model="tiny", config_hash=baked_hash,
        engine_start_s=1.0, capture_sizes=bake.capture,
    ))  # fmt: skip
    bake.cache.close()
    # traffic taught a wide shape since: a plan of its own would differ
    learn.write(learned, Counter({Shape(Kind("completions"), 1024, 64, 16): 500}), "tiny")
    serve = start("serve")
    assert serve.cache is not None
    serve.cache.close()
    assert serve.vllm_args.cudagraph_capture_sizes == bake.capture.sizes
    assert _gpu_config_hash(serve.vllm_args) == baked_hash  # the baked cache is hit
