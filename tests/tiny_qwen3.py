"""Tiny random Qwen3 ("tinkerbell/tiny-qwen3": q/k norms, untied lm_head) and Qwen2 (q/k/v biases), SmolLM2 tokenizer.

Built like tests/tiny_model.py's tiny Llama: deterministic (fixed seed), a few hundred thousand parameters.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

TINY_QWEN3_NAME = "tinkerbell/tiny-qwen3"
TINY_QWEN2_NAME = "tinkerbell/tiny-qwen2"
TINY_QWEN3_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA, and two KV heads so tensor parallel 2 splits whole groups
    "head_dim": 8,
    "max_position_embeddings": 512,
    "initializer_range": 0.5,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
}


def build_tiny_qwen3(dest_dir: str | os.PathLike[str], tokenizer_source: Path | None = None) -> Path:
    """Save the tiny Qwen3 + SmolLM2 tokenizer into dest_dir (e.g. <models_dir>/tinkerbell/tiny-qwen3); return it."""
    return _build("qwen3", dest_dir, tokenizer_source)


def build_tiny_qwen2(dest_dir: str | os.PathLike[str], tokenizer_source: Path | None = None) -> Path:
    """The same shape as a Qwen2 (q/k/v biases, no q/k norms), e.g. into <models_dir>/tinkerbell/tiny-qwen2."""
    return _build("qwen2", dest_dir, tokenizer_source)


def _build(family: str, dest_dir: str | os.PathLike[str], tokenizer_source: Path | None) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from tests.tiny_model import smollm2_tokenizer_dir

    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    source = Path(tokenizer_source) if tokenizer_source else smollm2_tokenizer_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
    tokenizer = AutoTokenizer.from_pretrained(str(dest))
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    bos = tokenizer.convert_tokens_to_ids(tokenizer.bos_token) if tokenizer.bos_token else eos
    config_class, model_class = (
        (Qwen3Config, Qwen3ForCausalLM) if family == "qwen3" else (Qwen2Config, Qwen2ForCausalLM)
    )
    fields = dict(TINY_QWEN3_CONFIG)
    if family == "qwen2":
        del fields["head_dim"]  # Qwen2: hidden_size / num_attention_heads (also 8)
    config = config_class(vocab_size=len(tokenizer), bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4321)
        model = model_class(config).to(torch.float32).eval()
        with torch.no_grad():  # random norms and biases, so a wrong conversion cannot hide behind ones and zeros
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.uniform_(0.5, 1.5)
                elif name.endswith(".bias"):
                    param.normal_(0.0, 0.5)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.save_pretrained(str(dest), safe_serialization=True)
    return dest
