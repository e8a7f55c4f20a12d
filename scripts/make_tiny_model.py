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
STAMP = "llmwarm-tiny-llama-v2"  # v2: with a LoRA adapter in lora/

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
    _lora(out / "lora", config, str(out))
    (out / "llmwarm-stamp.json").write_text(json.dumps({"stamp": STAMP}))


def _lora(out: Path, config: object, base: str, rank: int = 8) -> None:
    """A PEFT-format LoRA adapter on q_proj and v_proj (random, seeded): what
    `--lora-modules` or `/v1/load_lora_adapter` load."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    hidden = config.hidden_size  # type: ignore[attr-defined]
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(1)

    def small(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.01

    tensors = {}
    for layer in range(config.num_hidden_layers):  # type: ignore[attr-defined]
        for module, width in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(rank, hidden, generator=generator) * 0.01
            )
            tensors[f"{prefix}.lora_B.weight"] = (
                torch.randn(width, rank, generator=generator) * 0.01
            )
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none",
        "target_modules": ["q_proj", "v_proj"], "fan_in_fan_out": False,
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))


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
