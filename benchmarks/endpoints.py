"""Side by side, in one run: the first request of each request kind against its steady latency,
right after the server is ready, for plain vLLM's OpenAI server and for `llmwarm serve`, on
three models: the tiny Llama (completions, chat, Responses, Messages), the same served as an
embedding model (embeddings, pooling, score, rerank), and the tiny vision model (chat with
images). Both servers start from the same warm compile caches (one plain vLLM start fills
them first), so the ratio shows what the warm-up leaves cold, not compilation.

Writes the `endpoints` section of docs/benchmarks.md; `--json` keeps every number.

    python -m benchmarks.endpoints
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.launch import ENGINE_FLAGS, ROOT, engine_env, free_port, ready_server
from benchmarks.pages import write_section
from llmwarm import bench
from llmwarm.model.profile import load_profile, parse_profile, shipped

# A probe of the image kinds: what llmwarm's default warms on a vision model.
IMAGE_PROBE = {
    "endpoints": ["chat"],
    "buckets": [{"prompt_tokens": 16, "concurrency": 1, "max_tokens": 16}],
    "features": {"use": ["greedy", "image"]},
}
MODELS = {  # name: (model directory, extra flags, probe profile or None for the shipped one)
    "generate": (".cache/tiny-llama", [], None),
    "embedding": (".cache/tiny-llama", ["--runner", "pooling", "--convert", "embed"], None),
    "vision": (".cache/tiny-vision", [], IMAGE_PROBE),
}


def command(server: str, model: str, port: int, extra: list[str]) -> tuple[list[str], str]:
    common = [*ENGINE_FLAGS, "--host", "127.0.0.1", "--port", str(port),
              "--served-model-name", "m", *extra]  # fmt: skip
    if server == "vllm":
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                *common], "/health"  # fmt: skip
    return [sys.executable, "-m", "llmwarm", "serve", model, *common, "--report", os.devnull], (
        "/ready"
    )


def measure(server: str, name: str, env: dict[str, str], args: argparse.Namespace) -> Any:
    model, extra, probe = MODELS[name]
    port = free_port()
    cmd, ready_path = command(server, model, port, extra)
    profile = parse_profile(probe) if probe else load_profile(shipped("probe"))
    url = f"http://127.0.0.1:{port}"
    with ready_server(cmd, url, ready_path, env, args.log):
        report = asyncio.run(bench.probe(url, profile=profile, repeats=args.repeats, model="m"))
    return json.loads(report.model_dump_json())


def markdown(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "## Every endpoint: first request after ready, plain vLLM vs llmwarm",
        "",
        "`python -m benchmarks.endpoints` (one run, both servers on the same warm compile "
        f"caches; {args.repeats} steady repeats a kind; first / median of the repeats, end "
        "to end). The probe is `configs/probe.yaml` with the endpoints each server lists in "
        "its OpenAPI document; the vision rows probe the image kinds.",
        "",
        "| model | kind | vLLM first ms | vLLM first/steady | llmwarm first ms "
        "| llmwarm first/steady |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, pair in results.items():
        llmwarm = {(k["bucket"], k["kind"]): k for k in pair["llmwarm"]["kinds"]}
        for k in pair["vllm"]["kinds"]:
            w = llmwarm.get((k["bucket"], k["kind"]), {})

            def cell(x: dict[str, Any]) -> tuple[str, str]:
                if not x or x.get("ratio") is None:
                    return "refused" if x.get("error") else "-", "-"
                return f"{x['first_s'] * 1000:.1f}", f"{x['ratio']:.2f}x"

            v_first, v_ratio = cell(k)
            w_first, w_ratio = cell(w)
            lines.append(
                f"| {name} | {k['bucket']} {k['kind']} | {v_first} | {v_ratio} | {w_first} "
                f"| {w_ratio} |"
            )
        for server in ("vllm", "llmwarm"):
            r = pair[server]
            lines.append(
                f"| {name} | **{server}: geomean {r['geomean_ratio']:.2f}x, worst "
                f"{r['worst_ratio']:.2f}x** | | | | |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="steady requests per kind")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--log", type=Path, default=Path(".cache/bench-endpoints.log"))
    args = parser.parse_args()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    make = [sys.executable, str(ROOT / "scripts" / "make_tiny_model.py")]
    subprocess.run([*make, ".cache/tiny-llama"], check=True)
    subprocess.run([*make, "--vision", ".cache/tiny-vision"], check=True)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as cache:
        env = engine_env(
            VLLM_CACHE_ROOT=cache, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor")
        )
        for name in MODELS:
            measure("vllm", name, env, args)  # fills the compile caches both then start from
            results[name] = {s: measure(s, name, env, args) for s in ("vllm", "llmwarm")}
            for server, r in results[name].items():
                print(f"{name} {server}: geomean {r['geomean_ratio']:.2f}x, worst "
                      f"{r['worst_ratio']:.2f}x", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    write_section(args.docs / "benchmarks.md", "endpoints", markdown(results, args))


if __name__ == "__main__":
    main()
