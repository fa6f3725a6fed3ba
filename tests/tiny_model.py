"""A tiny random Llama ("tinkerbell/tiny-llama") with the real SmolLM2 tokenizer, for fast backend tests.

`build_tiny_model(dest_dir)` is deterministic (fixed seed) and cheap; the SmolLM2 tokenizer is extracted from
the packaged GGUF once into a persistent cache ($TINKERBELL_TEST_CACHE, default <repo>/.data/test-cache).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

TINY_MODEL_NAME = "tinkerbell/tiny-llama"
TINY_CONFIG = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,  # exercises GQA like SmolLM2 (9 heads / 3 kv heads)
    "max_position_embeddings": 512,
    "initializer_range": 0.5,  # peaked distributions, so sampling/greedy tests are meaningful
    "tie_word_embeddings": True,  # like SmolLM2
    "rms_norm_eps": 1e-5,
}
_REPO = Path(__file__).resolve().parent.parent


def test_cache_dir() -> Path:
    """Persistent cache shared by test sessions (tokenizer extraction takes ~4 s; do it once)."""
    return Path(os.environ.get("TINKERBELL_TEST_CACHE") or _REPO / ".data" / "test-cache")


test_cache_dir.__test__ = False  # not a pytest test


def smollm2_tokenizer_dir(cache_dir: Path | None = None) -> Path:
    """Directory with the real SmolLM2 tokenizer files (extracted from the packaged GGUF once)."""
    from backends.models import tokenizer_dir
    from core.settings import DEFAULT_BASE_MODEL, Settings

    cache = Path(cache_dir) if cache_dir else test_cache_dir()
    return tokenizer_dir(DEFAULT_BASE_MODEL, Settings(data_dir=str(cache), models_dir=""))


def build_tiny_model(dest_dir: str | os.PathLike[str], tokenizer_source: Path | None = None) -> Path:
    """Save the tiny model + SmolLM2 tokenizer into dest_dir (e.g. <models_dir>/tinkerbell/tiny-llama); return it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    source = Path(tokenizer_source) if tokenizer_source else smollm2_tokenizer_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
    tokenizer = AutoTokenizer.from_pretrained(str(dest))
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    bos = tokenizer.convert_tokens_to_ids(tokenizer.bos_token) if tokenizer.bos_token else eos
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, **TINY_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.save_pretrained(str(dest), safe_serialization=True)
    return dest


if __name__ == "__main__":
    import sys
    import time

    start = time.time()
    out = build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny-llama")
    print(f"{out} ({time.time() - start:.2f} s)")
