"""One registry for built-in and custom losses (DESIGN rule 6), and `compute_loss`, the entry point backends call.

Every loss is reached through the same batch-level signature, `LossFn`; custom losses are adapted to it.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from core.errors import UserError, unpublished_loss
from losses.contract import (
    CustomLossFn,
    call_custom_loss,
    normalize_metric_key,
    pad_batch,
)

# fn(target_logprobs, loss_fn_inputs, config) -> (loss, metrics); see compute_loss for what each argument holds.
LossFn = Callable[[list[Tensor], list[dict[str, Tensor]], dict[str, Any]], tuple[Tensor, dict[str, float]]]

# Loose enough for owner-qualified custom names such as "key123/my_loss"; never empty, no spaces.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/\-]{0,255}")


@dataclass(frozen=True)
class LossEntry:
    """A registered loss. `run` has the LossFn signature for built-in and custom losses alike."""

    name: str
    fn: Callable[..., Any]
    run: LossFn
    builtin: bool
    custom: bool
    doc: str
    required_inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...]
    config: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[str, ...] = ()


_LOSSES: dict[str, LossEntry] = {}


def register_loss(
    name: str,
    fn: Callable[..., Any],
    *,
    builtin: bool = False,
    custom: bool = False,
    doc: str | None = None,
    required_inputs: tuple[str, ...] = (),
    optional_inputs: tuple[str, ...] = (),
    config: dict[str, Any] | None = None,
    metrics: tuple[str, ...] = (),
    replace: bool = False,
) -> None:
    """Add a loss under `name`.

    builtin=True: `fn` is a LossFn over per-datum tensors (see compute_loss). custom=True: `fn` follows the
    contract in losses/contract.py and gets padded (B, T) batches. `target_tokens` is always required.
    `config` documents the loss_fn_config keys and their defaults; `metrics` the keys it emits.
    A built-in name cannot be taken by another loss; an existing name is replaced only with replace=True.
    """
    if builtin and custom:
        raise ValueError("register_loss: a loss is either builtin or custom, not both")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name == "custom":
        raise UserError(f"loss name {name!r}: must match {_NAME_RE.pattern} and not be 'custom'")
    if not callable(fn):
        raise UserError(f"loss {name!r}: fn is {type(fn).__name__}, not callable")
    existing = _LOSSES.get(name)
    if existing is not None and existing.builtin and not builtin:
        raise UserError(f"loss name {name!r}: taken by a built-in loss")
    if existing is not None and not replace:
        raise UserError(f"loss name {name!r}: already registered (pass replace=True to replace it)")
    required = ("target_tokens", *(k for k in required_inputs if k != "target_tokens"))
    _LOSSES[name] = LossEntry(
        name=name,
        fn=fn,
        run=_custom_runner(name, fn) if custom else fn,
        builtin=builtin,
        custom=custom,
        doc=inspect.cleandoc(doc or fn.__doc__ or ""),
        required_inputs=required,
        optional_inputs=tuple(optional_inputs),
        config=dict(config or {}),
        metrics=("loss:sum", *(m for m in metrics if m != "loss:sum")),
    )


def unregister_loss(name: str) -> None:
    """Remove a non-built-in loss (e.g. a custom loss being deleted). Unknown names are ignored."""
    entry = _LOSSES.get(name)
    if entry is not None and entry.builtin:
        raise UserError(f"loss name {name!r}: built-in losses cannot be removed")
    _LOSSES.pop(name, None)


def get_loss_entry(name: str) -> LossEntry:
    """The registered entry for `name`; UserError naming the available losses when there is none."""
    entry = _LOSSES.get(name) if isinstance(name, str) else None
    if entry is None:
        # Only built-ins are named: the other entries are custom losses of some key, and their names are its own.
        builtins = sorted(n for n, e in _LOSSES.items() if e.builtin)
        refusal = unpublished_loss(name, builtins)
        if refusal is not None:
            raise refusal
        hint = " (loss_fn 'custom' needs loss_fn_config.loss_id)" if name == "custom" else ""
        raise UserError(
            f"loss_fn: unknown loss {name!r}{hint}; built-in: {', '.join(builtins)}, or a custom loss of your own"
        )
    return entry


def get_loss(name: str) -> LossFn:
    """The batch-level callable for `name` (custom losses come back adapted to the LossFn signature)."""
    return get_loss_entry(name).run


def list_losses() -> list[dict[str, Any]]:
    """Plain-data description of every registered loss, built-ins first, then by name."""
    rows = []
    for entry in sorted(_LOSSES.values(), key=lambda e: (not e.builtin, e.name)):
        try:
            signature = f"{entry.name}{inspect.signature(entry.fn)}"
        except (TypeError, ValueError):
            signature = entry.name
        rows.append(
            {
                "name": entry.name,
                "builtin": entry.builtin,
                "custom": entry.custom,
                "signature": signature,
                "docstring": entry.doc,
                "required_inputs": list(entry.required_inputs),
                "optional_inputs": list(entry.optional_inputs),
                "config": dict(entry.config),
                "metrics": list(entry.metrics),
            }
        )
    return rows


def compute_loss(
    loss_fn: str,
    target_logprobs: list[Tensor],
    loss_fn_inputs: list[dict[str, Tensor]],
    config: dict[str, Any],
) -> tuple[Tensor, dict[str, float]]:
    """Loss (summed over tokens and datums) and metrics for one forward_backward request.

    target_logprobs[i]: datum i's logprobs of its target tokens, shaped like target_tokens ((N,) or (N, K)).
    loss_fn_inputs[i]: datum i's tensors (target_tokens int64; weights, logprobs, advantages, ... float32).
    config: loss_fn_config. loss_fn "custom" looks up config["loss_id"] among the custom losses.
    Metrics always include "loss:sum". Bad input raises UserError naming the field.
    """
    config = dict(config or {})
    if loss_fn == "custom":
        loss_id = config.pop("loss_id", None)
        if not isinstance(loss_id, str) or not loss_id:
            raise UserError("loss_fn_config.loss_id: required (the name of an uploaded loss) when loss_fn is 'custom'")
        entry = get_loss_entry(loss_id)
        if not entry.custom:
            raise UserError(
                f"loss_fn_config.loss_id: {loss_id!r} is not a custom loss; pass loss_fn={loss_id!r} instead"
            )
    else:
        entry = get_loss_entry(loss_fn)
        if entry.custom:
            config.pop("loss_id", None)  # addressing, not an argument of the loss

    logprobs, inputs = _prepare(entry, target_logprobs, loss_fn_inputs)
    loss, raw_metrics = entry.run(logprobs, inputs, config)

    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError(
            f"loss {entry.name!r} returned {type(loss).__name__} {getattr(loss, 'shape', '')}, not a scalar tensor"
        )
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        raise UserError(
            f"loss_fn {entry.name!r}: loss is not finite ({loss_value}); loss_fn_inputs are finite, so a term "
            "overflowed:"
            " a -inf target logprob, or exp(lp - loss_fn_inputs.logprobs) with sampler logprobs far from the model's"
        )
    metrics = {normalize_metric_key(k, default_reduction=None): float(v) for k, v in raw_metrics.items()}
    metrics["loss:sum"] = loss_value
    return loss, metrics


def _prepare(
    entry: LossEntry, target_logprobs: list[Tensor], loss_fn_inputs: list[dict[str, Tensor]]
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Check every datum's inputs against the loss and target_tokens; return float32 logprobs and inputs.

    Built-in losses get their per-token inputs as float32 shaped exactly like target_tokens ((N,) inputs are
    broadcast over K when target_tokens is (N, K)); custom losses get the tensors as sent.
    """
    if len(target_logprobs) != len(loss_fn_inputs):
        raise ValueError(f"compute_loss: {len(target_logprobs)} target_logprobs for {len(loss_fn_inputs)} datums")
    if not loss_fn_inputs:
        raise UserError("data: at least one datum is required")
    first_keys = set(loss_fn_inputs[0]) if isinstance(loss_fn_inputs[0], dict) else set()
    logprobs_out: list[Tensor] = []
    inputs_out: list[dict[str, Tensor]] = []
    finite_checks: list[tuple[str, Tensor]] = []
    for i, (lp, datum) in enumerate(zip(target_logprobs, loss_fn_inputs)):
        where = f"loss_fn_inputs[{i}]"
        if not isinstance(datum, dict):
            raise UserError(f"{where}: expected a map of name -> tensor, got {type(datum).__name__}")
        for key in entry.required_inputs:
            if key not in datum:
                raise UserError(f"{where}.{key}: required by {entry.name}")
        target = _tensor(datum["target_tokens"], f"{where}.target_tokens")
        if target.dim() not in (1, 2) or target.is_floating_point() or target.dtype == torch.bool:
            raise UserError(
                f"{where}.target_tokens: expected an integer tensor of shape (N,) or (N, K), got {target.dtype} "
                f"{tuple(target.shape)}"
            )
        if tuple(lp.shape) != tuple(target.shape):
            raise ValueError(f"target_logprobs[{i}] has shape {tuple(lp.shape)}, target_tokens {tuple(target.shape)}")
        logprobs_out.append(lp.float())

        prepared = dict(datum)
        if entry.custom:
            if set(datum) != first_keys:
                raise UserError(
                    f"{where}: keys {sorted(datum)} differ from loss_fn_inputs[0] {sorted(first_keys)}; a custom "
                    "loss needs the same keys in every datum"
                )
            for key in sorted(set(datum) - {"target_tokens"}):
                value = _tensor(datum[key], f"{where}.{key}")
                first = loss_fn_inputs[0][key]
                if (
                    value.dim() < 1
                    or value.shape[0] != target.shape[0]
                    or tuple(value.shape[1:]) != tuple(getattr(first, "shape", ())[1:])
                ):
                    raise UserError(
                        f"{where}.{key}: shape {tuple(value.shape)} does not match target_tokens {tuple(target.shape)}"
                        f" (need N={target.shape[0]} first, and the same trailing shape in every datum)"
                    )
                if value.dtype != first.dtype:
                    raise UserError(
                        f"{where}.{key}: dtype {value.dtype} differs from loss_fn_inputs[0].{key} ({first.dtype})"
                    )
                if value.is_floating_point():
                    finite_checks.append((f"{where}.{key}", value))
        else:
            for key in entry.required_inputs + entry.optional_inputs:
                if key == "target_tokens" or key not in datum:
                    continue
                value = _tensor(datum[key], f"{where}.{key}")
                if tuple(value.shape) != tuple(target.shape):
                    if target.dim() == 2 and tuple(value.shape) == tuple(target.shape[:1]):
                        value = value.unsqueeze(1).expand_as(target)  # (N,) -> (N, K)
                    else:
                        allowed = f" or ({target.shape[0]},)" if target.dim() == 2 else ""
                        raise UserError(
                            f"{where}.{key}: shape {tuple(value.shape)} does not match target_tokens "
                            f"{tuple(target.shape)}{allowed}"
                        )
                value = value.to(torch.float32)
                finite_checks.append((f"{where}.{key}", value))
                prepared[key] = value
        inputs_out.append(prepared)

    if finite_checks:
        # One device sync for all the checks; look for the culprit only when one fails.
        finite = torch.stack([torch.isfinite(v).all() for _, v in finite_checks]).tolist()
        for (field_name, _), ok in zip(finite_checks, finite):
            if not ok:
                raise UserError(f"{field_name}: contains nan or inf")
    return logprobs_out, inputs_out


def _tensor(value: Any, field_name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise UserError(f"{field_name}: expected a tensor, got {type(value).__name__}")
    return value


def _custom_runner(name: str, fn: CustomLossFn) -> LossFn:
    """Adapt a custom-contract loss to LossFn: pad the datums into (B, T) batches and check its result."""

    def run(
        target_logprobs: list[Tensor], loss_fn_inputs: list[dict[str, Tensor]], config: dict[str, Any]
    ) -> tuple[Tensor, dict[str, float]]:
        logprobs, attention_mask = pad_batch(target_logprobs)  # (B, T), (B, T)
        padded = {key: pad_batch([datum[key] for datum in loss_fn_inputs])[0] for key in loss_fn_inputs[0]}
        model_outputs = {"logprobs": logprobs, "target_tokens": padded["target_tokens"]}
        return call_custom_loss(fn, model_outputs, padded, attention_mask, config, name=name)

    run.__doc__ = fn.__doc__
    return run
