"""Build a deterministic tiny random Llama that vLLM can load, with no model hub.

Usage: python scripts/make_tiny_model.py OUT_DIR

The weights are random (seeded), the tokenizer is a byte-level BPE trained on a fixed
built-in text, and the tokenizer config carries a chat template. It takes seconds and
writes about 3 MB. Rebuilding into an existing directory with a matching stamp does nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Bump when anything below changes, so stale models are rebuilt.
STAMP = "llmwarm-tiny-llama-v1"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# A fixed text so the trained tokenizer is identical on every machine.
_WORDS = (
    "the model serves requests warm and cold latency token prompt output stream chat "
    "engine cache kernel graph compile batch decode prefill request response server "
    "client health ready profile bucket round median converge report metric time first "
    "second minute hour day week data value number text word sentence paragraph page "
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
    "rho sigma tau upsilon phi chi psi omega one two three four five six seven eight nine"
).split()


def _corpus() -> list[str]:
    lines = []
    for i in range(2000):
        words = [_WORDS[(i * 7 + j * 13) % len(_WORDS)] for j in range(8 + i % 9)]
        lines.append(" ".join(words) + f" {i}.")
    lines.append('{"key": [1, 2.5, true, null], "name": "value"} <>=!?;:,-_+*/\\|@#$%^&()')
    return lines


def build(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: vLLM's CPU attention rejects 16
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    (out / "llmwarm-stamp.json").write_text(json.dumps({"stamp": STAMP}))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: make_tiny_model.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    stamp = out / "llmwarm-stamp.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("stamp") == STAMP:
        return 0
    build(out)
    print(f"tiny model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
