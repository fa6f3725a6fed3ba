"""The custom-loss contract: what a user-written loss receives, what it must return, and the checks on it.

Metric-key rules (`name:reduction`, exactly one colon) live here too, shared by built-in and custom losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from core.errors import UserError

# Reductions the SDK knows how to combine across chunks (an unknown one is dropped silently by the client).
VALID_REDUCTIONS = ("mean", "sum", "min", "max", "slack")


@dataclass
class LossFnOutput:
    """What a custom loss returns.

    loss: scalar tensor, connected to model_outputs["logprobs"] when that requires grad.
    logprobs: optional per-datum logprobs to report back, (B, T) like model_outputs["logprobs"] or a list of B tensors.
    diagnostics: metrics; a key without a colon gets ":mean" appended, "name:reduction" is kept as is.
    """

    loss: Tensor
    logprobs: Tensor | list[Tensor] | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)


# A custom loss: fn(model_outputs, loss_fn_inputs, attention_mask, **config) -> LossFnOutput
#   model_outputs  = {"logprobs": (B, T) float, zeros at padding; "target_tokens": (B, T) int64, zeros at padding}
#                    (with 2-D (N, K) targets the shapes are (B, T, K))
#   loss_fn_inputs = {key: (B, T, ...) tensor padded with zeros} for every key the datums carry
#   attention_mask = (B, T) float32, 1.0 at real positions, 0.0 at padding
CustomLossFn = Callable[..., Any]


def normalize_metric_key(key: object, *, default_reduction: str | None = "mean") -> str:
    """Return `key` as "name:reduction"; append ":<default_reduction>" when it has no colon.

    Raises UserError for a non-string key, more than one colon, an empty name or an unknown reduction.
    """
    if not isinstance(key, str):
        raise UserError(f"metric key {key!r}: must be a string")
    if ":" not in key:
        if default_reduction is None:
            raise UserError(f"metric key {key!r}: must be 'name:reduction', e.g. '{key}:mean'")
        key = f"{key}:{default_reduction}"
    parts = key.split(":")
    if len(parts) != 2:
        raise UserError(f"metric key {key!r}: must contain exactly one ':' (name:reduction), the SDK splits on it")
    name, reduction = parts
    if not name:
        raise UserError(f"metric key {key!r}: name before ':' is empty")
    if reduction not in VALID_REDUCTIONS:
        raise UserError(f"metric key {key!r}: unknown reduction {reduction!r}; valid: {', '.join(VALID_REDUCTIONS)}")
    return key


def pad_batch(tensors: list[Tensor], pad_value: float = 0.0) -> tuple[Tensor, Tensor]:
    """Stack per-datum tensors of shape (N_i, *rest) into (B, T, *rest), T = max N_i, padded with `pad_value`.

    Returns (padded, mask) with mask (B, T) float32, 1.0 at real positions. All tensors must share `rest`,
    dtype and device.
    """
    if not tensors:
        raise ValueError("pad_batch: needs at least one tensor")
    first = tensors[0]
    if first.dim() < 1:
        raise ValueError("pad_batch: tensors must have at least one dimension")
    rest = tuple(first.shape[1:])
    for i, t in enumerate(tensors):
        if t.dim() < 1 or tuple(t.shape[1:]) != rest:
            raise ValueError(f"pad_batch: tensor {i} has shape {tuple(t.shape)}; every tensor must be (N_i, *{rest})")
    padded = pad_sequence(tensors, batch_first=True, padding_value=pad_value)  # (B, T, *rest)
    lengths = torch.tensor([t.shape[0] for t in tensors], device=first.device)  # (B,)
    positions = torch.arange(padded.shape[1], device=first.device)  # (T,)
    mask = (positions[None, :] < lengths[:, None]).to(torch.float32)  # (B, T)
    return padded, mask


def _unpack(result: Any, name: str) -> LossFnOutput:
    if isinstance(result, LossFnOutput):
        return result
    if isinstance(result, tuple):
        if len(result) != 2:
            raise UserError(
                f"custom loss {name!r}: returned a tuple of {len(result)} items; expected (loss, diagnostics)"
            )
        return LossFnOutput(loss=result[0], diagnostics=result[1])
    if isinstance(result, dict):
        if "loss" not in result:
            raise UserError(f"custom loss {name!r}: returned a dict without 'loss' (keys: {sorted(map(str, result))})")
        extra = set(result) - {"loss", "logprobs", "diagnostics"}
        if extra:
            raise UserError(
                f"custom loss {name!r}: returned dict has unexpected keys {sorted(map(str, extra))}; allowed: loss, "
                "logprobs, diagnostics"
            )
        return LossFnOutput(
            loss=result["loss"], logprobs=result.get("logprobs"), diagnostics=result.get("diagnostics") or {}
        )
    raise UserError(
        f"custom loss {name!r}: returned {type(result).__name__}; expected LossFnOutput, a (loss, diagnostics) tuple "
        "or a dict with 'loss'"
    )


def _diagnostic_value(key: str, value: Any, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise UserError(
                f"custom loss {name!r}: diagnostics[{key!r}] is a tensor of shape {tuple(value.shape)}; expected a "
                "single number"
            )
        value = value.detach().item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"custom loss {name!r}: diagnostics[{key!r}] is {type(value).__name__}; expected a number")
    value = float(value)
    if not math.isfinite(value):
        raise UserError(f"custom loss {name!r}: diagnostics[{key!r}] is not finite ({value})")
    return value


def _check_logprobs(logprobs: Any, reference: Tensor, name: str) -> None:
    if logprobs is None:
        return
    if isinstance(logprobs, Tensor):
        if logprobs.shape != reference.shape:
            raise UserError(
                f"custom loss {name!r}: logprobs has shape {tuple(logprobs.shape)}; expected "
                f"{tuple(reference.shape)} like model_outputs['logprobs']"
            )
        return
    if isinstance(logprobs, list) and all(isinstance(t, Tensor) for t in logprobs):
        if len(logprobs) != reference.shape[0]:
            raise UserError(
                f"custom loss {name!r}: logprobs is a list of {len(logprobs)} tensors; expected one per datum "
                f"({reference.shape[0]})"
            )
        return
    raise UserError(
        f"custom loss {name!r}: logprobs is {type(logprobs).__name__}; expected a tensor, a list of tensors or None"
    )


def call_custom_loss(
    fn: CustomLossFn,
    model_outputs: dict[str, Tensor],
    loss_fn_inputs: dict[str, Tensor],
    attention_mask: Tensor,
    config: dict[str, Any],
    *,
    name: str = "custom",
) -> tuple[Tensor, dict[str, float]]:
    """Call `fn(model_outputs, loss_fn_inputs, attention_mask, **config)` and check what comes back.

    Returns (loss, metrics): loss a finite scalar tensor, metrics with "name:reduction" keys. Anything the
    user's code gets wrong (including an exception it raises) becomes a UserError that says what and where.
    """
    try:
        result = fn(model_outputs, loss_fn_inputs, attention_mask, **config)
    except torch.OutOfMemoryError:
        raise
    except UserError:
        raise
    except Exception as exc:  # user code: any failure is the user's, reported with its type and message
        raise UserError(f"custom loss {name!r} raised {type(exc).__name__}: {exc}") from exc
    out = _unpack(result, name)

    loss = out.loss
    if not isinstance(loss, Tensor):
        raise UserError(f"custom loss {name!r}: loss is {type(loss).__name__}; expected a torch scalar tensor")
    if loss.dim() != 0:
        raise UserError(
            f"custom loss {name!r}: loss has shape {tuple(loss.shape)}; expected a scalar (reduce it, e.g. .sum())"
        )
    if not loss.is_floating_point():
        raise UserError(f"custom loss {name!r}: loss has dtype {loss.dtype}; expected a floating-point tensor")
    if not torch.isfinite(loss).item():
        raise UserError(f"custom loss {name!r}: loss is not finite ({loss.item()})")
    logprobs = model_outputs.get("logprobs")
    if isinstance(logprobs, Tensor) and logprobs.requires_grad and not loss.requires_grad:
        raise UserError(
            f"custom loss {name!r}: loss does not require grad; it must be computed from model_outputs['logprobs'] "
            "(no .detach(), .item() or torch.no_grad())"
        )
    if isinstance(logprobs, Tensor):
        _check_logprobs(out.logprobs, logprobs, name)

    if not isinstance(out.diagnostics, dict):
        raise UserError(
            f"custom loss {name!r}: diagnostics is {type(out.diagnostics).__name__}; expected a dict of str -> number"
        )
    metrics: dict[str, float] = {}
    for key, value in out.diagnostics.items():
        try:
            metric_key = normalize_metric_key(key)
        except UserError as exc:
            raise UserError(f"custom loss {name!r}: diagnostics: {exc}") from None
        metrics[metric_key] = _diagnostic_value(str(key), value, name)
    return loss, metrics
