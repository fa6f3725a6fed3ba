"""Checks every training backend makes on a forward/backward datum, on Adam's parameters and on a checkpoint it
loads, in one place.

A failure is a UserError naming the field (`data[i].loss_fn_inputs.weights: …`), the same whichever backend runs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backends.base import AdamSpec
from core.errors import UserError

# loss_fn_inputs that carry one value per target position, so their shape must follow target_tokens.
PER_TOKEN_INPUTS = ("weights", "advantages", "logprobs", "mask", "sequence_ratio_mask")


def int_array(value: Any, field: str) -> np.ndarray:
    """Token ids as int64; floats are accepted only when every one is a whole finite number."""
    arr = np.asarray(value)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64, copy=False)
    if arr.size == 0 or (arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
        return arr.astype(np.int64)
    raise UserError(f"{field}: token ids must be integers, got dtype {arr.dtype}")


def check_range(arr: np.ndarray, vocab: int, field: str) -> None:
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab):
        bad = int(arr.min()) if int(arr.min()) < 0 else int(arr.max())
        raise UserError(f"{field}: token id {bad} is outside the vocabulary [0, {vocab})")


def check_datum(
    i: int, datum: Any, vocab_in: int, vocab_out: int, max_len: int | None, device: torch.device | str
) -> tuple[np.ndarray, np.ndarray, dict[str, torch.Tensor]]:
    """Datum i of a request, checked: (input ids (N,), target ids (N,) or (N, K), loss_fn_inputs as tensors on
    `device` — copies, since wire-decoded arrays are read-only views of the message bytes)."""
    ids = int_array(datum.tokens, f"data[{i}].model_input")
    if ids.ndim != 1 or ids.size == 0:
        raise UserError(f"data[{i}].model_input: expected a non-empty 1-D token list, got shape {tuple(ids.shape)}")
    n = int(ids.size)
    check_range(ids, vocab_in, f"data[{i}].model_input")
    if max_len and n > max_len:
        raise UserError(f"data[{i}].model_input: {n} tokens exceed the model's context length {max_len}")
    fn_inputs = dict(datum.loss_fn_inputs or {})
    if "target_tokens" not in fn_inputs:
        raise UserError(f"data[{i}].loss_fn_inputs.target_tokens: required")
    target = int_array(fn_inputs["target_tokens"], f"data[{i}].loss_fn_inputs.target_tokens")
    if target.ndim not in (1, 2) or target.shape[0] != n or (target.ndim == 2 and target.shape[1] == 0):
        raise UserError(
            f"data[{i}].loss_fn_inputs.target_tokens: shape {tuple(target.shape)} does not match model_input "
            f"length {n} (expected (N,) or (N, K))"
        )
    check_range(target, vocab_out, f"data[{i}].loss_fn_inputs.target_tokens")
    converted: dict[str, torch.Tensor] = {"target_tokens": torch.tensor(target, device=device)}
    for key, value in fn_inputs.items():
        if key == "target_tokens":
            continue
        arr = np.asarray(value)
        if key in PER_TOKEN_INPUTS and (
            arr.ndim == 0 or arr.shape[0] != n or (arr.ndim == 2 and arr.shape != target.shape)
        ):
            raise UserError(
                f"data[{i}].loss_fn_inputs.{key}: shape {tuple(arr.shape)} does not match target_tokens "
                f"{tuple(target.shape)}"
            )
        if arr.dtype.kind not in "biuf":
            raise UserError(f"data[{i}].loss_fn_inputs.{key}: expected numbers, got dtype {arr.dtype}")
        converted[key] = torch.tensor(arr, dtype=torch.float32 if arr.dtype.kind == "f" else torch.int64, device=device)
    return ids, target, converted


def check_lora_state(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor]) -> None:
    """A checkpoint's LoRA tensors (`.lora_` keys) against the adapter's {name: shape}."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        raise UserError(
            "path: checkpoint does not match this adapter's LoRA config (rank / trained modules): "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}"
        )


ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file names
OPTIMIZER_STATE = "optimizer.pt"


def read_checkpoint(
    directory: str | Path, expected: dict[str, tuple[int, ...]], with_optimizer: bool, map_location: Any
) -> tuple[dict[str, torch.Tensor], Any | None]:
    """A PEFT-format checkpoint's LoRA tensors, checked against the adapter's {name: full shape}, and its optimizer
    state (torch.load'ed to `map_location`) when asked; anything missing or unreadable is a UserError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    src = Path(directory)
    if not (src / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"path: no {ADAPTER_WEIGHTS} in the checkpoint")
    try:
        # PEFT may also save the (unchanged) base lm_head/embedding weights next to the LoRA ones; only LoRA counts.
        state = {k: v for k, v in load_file(str(src / ADAPTER_WEIGHTS)).items() if ".lora_" in k}
    except (SafetensorError, OSError) as exc:
        raise UserError(f"path: unreadable adapter weights ({exc})") from exc
    check_lora_state(expected, state)
    if not with_optimizer:
        return state, None
    if not (src / OPTIMIZER_STATE).is_file():
        raise UserError(f"path: checkpoint has no optimizer state ({OPTIMIZER_STATE}); load it without the optimizer")
    return state, torch.load(src / OPTIMIZER_STATE, map_location=map_location, weights_only=True)


def check_adam(adam: AdamSpec) -> None:
    checks = {
        "learning_rate": adam.learning_rate >= 0,
        "beta1": 0 <= adam.beta1 < 1,
        "beta2": 0 <= adam.beta2 < 1,
        "eps": adam.eps >= 0,
        "weight_decay": adam.weight_decay >= 0,
        "grad_clip_norm": adam.grad_clip_norm >= 0,
    }
    for key, ok in checks.items():
        value = getattr(adam, key)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
            raise UserError(f"adam_params.{key}: invalid value {value!r}")


def step_adam(optimizer: torch.optim.Optimizer, adam: AdamSpec) -> None:
    """One AdamW step with this request's hyperparameters, then the gradients are dropped."""
    for group in optimizer.param_groups:
        group.update(
            lr=float(adam.learning_rate),
            betas=(float(adam.beta1), float(adam.beta2)),
            eps=float(adam.eps),
            weight_decay=float(adam.weight_decay),
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
