"""Shared bits of the custom-loss examples: command line, a tokenizer, datums, and a small training loop.

Not an example itself; see custom_loss_dpo.py, custom_loss_contrastive.py, custom_loss_kl_sft.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from client import TinkerbellClient


def parse_args(description: str, steps: int = 10) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the Tinkerbell API")
    parser.add_argument(
        "--api-key",
        default="tml-local",
        help="a key with the custom_code scope (any tml- key when TINKERBELL_AUTH=off)",
    )
    parser.add_argument("--base-model", default=None, help="default: the service's default base model")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    return parser.parse_args()


def tokenizer(base_model: str | None) -> Callable[[str], list[int]]:
    """The model's tokenizer when transformers can find it locally; else UTF-8 bytes (valid ids in any vocab >= 256)."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(base_model or "HuggingFaceTB/SmolLM2-135M-Instruct")
        return lambda text: tok.encode(text, add_special_tokens=False)
    except Exception:  # noqa: BLE001 -- offline and not cached: the byte fallback is fine for a demo
        return lambda text: list(text.encode())


def datum(prompt: list[int], completion: list[int], **per_token: list[float]) -> dict[str, Any]:
    """One sequence: predict every next token, count only the completion (weights 1 there, 0 on the prompt)."""
    tokens = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    inputs: dict[str, Any] = {"target_tokens": tokens[1:], "weights": weights}
    inputs.update(per_token)
    return {"model_input": tokens[:-1], "loss_fn_inputs": inputs}


def logprobs_of(output: dict[str, Any]) -> list[float]:
    return list(output["logprobs"]["data"] if isinstance(output["logprobs"], dict) else output["logprobs"])


def train(
    client: TinkerbellClient,
    model_id: str,
    data: list[dict[str, Any]],
    loss_fn: str,
    config: dict[str, Any],
    steps: int,
    learning_rate: float,
) -> dict[str, float]:
    """forward_backward with the custom loss + optim_step, `steps` times; prints and returns the last metrics."""
    metrics: dict[str, float] = {}
    for step in range(steps):
        metrics = client.forward_backward(model_id, data, loss_fn=loss_fn, loss_fn_config=config).result(120)["metrics"]
        client.optim_step(model_id, learning_rate=learning_rate).result(120)
        shown = "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        print(f"step {step:3d}  {shown}")
    return metrics
