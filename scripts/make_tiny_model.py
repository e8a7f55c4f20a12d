"""Build a deterministic tiny random Llama that vLLM can load, with no model hub.

Usage: python scripts/make_tiny_model.py [--vision | --classifier | --moe] OUT_DIR

--classifier builds the same tiny Llama as a cross-encoder (LlamaForSequenceClassification,
one label), which vLLM serves on /classify, /score and /rerank (and /pooling).

--moe builds a tiny Mixtral instead (4 experts, 2 a token, the same tokenizer): a
mixture-of-experts model, which vLLM requires for data parallelism with an external load
balancer (one API server per rank, as wide-EP deployments run).

--vision builds a tiny random Idefics3 instead (a SigLIP-like vision encoder before the same
tiny Llama): a vision-language model that vLLM's CPU build loads. LLaVA, PaliGemma, Qwen2-VL
and most others import torchvision in vLLM 0.32 (e.g. `vision.get_vision_encoder_info` imports
pixtral), and PyPI's torchvision is a CUDA build that breaks beside the CPU torch.

The weights are random (seeded), the tokenizer is a byte-level BPE trained on a fixed
built-in text, and the tokenizer config carries a chat template. It takes seconds and
writes about 3 MB. Rebuilding into an existing directory with a matching stamp does nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

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


def _tokenizer(extra: list[str], **special: Any) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<unk>", "<s>", "</s>", *extra],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **special
    )


def _llama_config(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: vLLM's CPU attention rejects 16
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )


def _chat_tokenizer(out: Path) -> Any:
    """The text models' tokenizer with its chat template, saved in `out`; the weights that
    follow are seeded."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    fast = _tokenizer([])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    torch.manual_seed(0)
    return fast


def build(out: Path) -> None:
    from transformers import LlamaForCausalLM

    fast = _chat_tokenizer(out)
    config = _llama_config(fast)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    _lora(out / "lora", config, str(out))


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


# The chat template of the vision model: an image part becomes the processor's <image>.
VISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_vision(out: Path) -> None:
    """A tiny random Idefics3: 32x32 tiles of 8x8 patches, 4 image tokens a tile."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        Idefics3VisionConfig,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,  # the PIL one: no torchvision
    )

    out.mkdir(parents=True, exist_ok=True)
    tiles = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    markers = {
        "image_token": "<image>",
        "fake_image_token": "<fake_token_around_image>",
        "global_image_token": "<global-img>",
        "end_of_utterance_token": "<end_of_utterance>",
    }
    fast = _tokenizer([*markers.values(), *tiles], extra_special_tokens=markers)
    fast.chat_template = VISION_CHAT_TEMPLATE
    images = Idefics3ImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True
    )
    processor = Idefics3Processor(
        image_processor=images, tokenizer=fast, image_seq_len=4,
        chat_template=VISION_CHAT_TEMPLATE,
    )  # fmt: skip
    processor.save_pretrained(out)
    torch.manual_seed(0)
    vision = Idefics3VisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8,
    )  # fmt: skip
    config = Idefics3Config(
        vision_config=vision.to_dict(),
        text_config=_llama_config(fast).to_dict(),
        image_token_id=fast.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        torch_dtype="float32",
    )
    Idefics3ForConditionalGeneration(config).save_pretrained(out, safe_serialization=True)


def build_classifier(out: Path) -> None:
    """The tiny Llama as a one-label sequence classifier: a cross-encoder."""
    import torch
    from transformers import LlamaForSequenceClassification

    out.mkdir(parents=True, exist_ok=True)
    fast = _tokenizer([])
    fast.pad_token = fast.eos_token  # a classifier pools at the last non-pad token
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = _llama_config(fast)
    config.num_labels = 1  # one score: vLLM enables /score and /rerank for it
    config.pad_token_id = fast.eos_token_id
    LlamaForSequenceClassification(config).save_pretrained(out, safe_serialization=True)


def build_moe(out: Path) -> None:
    """The tiny Llama's shape as a Mixtral: 4 experts, 2 of them a token."""
    from transformers import MixtralConfig, MixtralForCausalLM

    llama = _llama_config(_chat_tokenizer(out))
    config = MixtralConfig(
        **{k: getattr(llama, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
            "bos_token_id", "eos_token_id")},
        num_local_experts=4,
        num_experts_per_tok=2,
        torch_dtype="float32",
    )  # fmt: skip
    MixtralForCausalLM(config).save_pretrained(out, safe_serialization=True)


BUILDERS = {
    "": build, "--vision": build_vision, "--classifier": build_classifier, "--moe": build_moe,
}  # fmt: skip


def main(argv: list[str]) -> int:
    kinds = [a for a in argv if a in BUILDERS]
    args = [a for a in argv if a not in BUILDERS]
    if len(args) != 1 or len(kinds) > 1:
        print(
            "usage: make_tiny_model.py [--vision | --classifier | --moe] OUT_DIR", file=sys.stderr
        )
        return 2
    kind = kinds[0] if kinds else ""
    out = Path(args[0])
    stamp = out / "llmwarm-stamp.json"
    want = STAMP + kind.replace("--", "-")
    if not (stamp.exists() and json.loads(stamp.read_text()).get("stamp") == want):
        BUILDERS[kind](out)
        stamp.write_text(json.dumps({"stamp": want}))
        print(f"tiny model{kind.replace('--', ' (') + ')' if kind else ''} written to {out}")
    readable(out)
    return 0


def readable(out: Path) -> None:
    """Every file readable by anyone, as a model volume is (safetensors writes its file 0600,
    which a container's own user could not read)."""
    for path in [out, *out.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
