"""The built-in losses, with the formulas of the Tinker docs (tinker-wire-protocol.md §4), registered on import.

Per token, summed over tokens and datums, never averaged. lp = the trained model's target logprobs,
slp = loss_fn_inputs.logprobs (the sampler's), A = loss_fn_inputs.advantages.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from core.errors import UserError
from losses.registry import register_loss

CLIP_LOW_THRESHOLD = 0.8  # ppo / cispo / gspo default: 1 - ε with the documented ε = 0.2
CLIP_HIGH_THRESHOLD = 1.2  # 1 + ε
DRO_BETA = 0.05  # dro default: weight of the quadratic penalty 0.5·β·(lp - slp)²; the docs give no value

RATIO_METRICS = ("ratio:mean", "ratio:min", "ratio:max")


def _cat(tensors: list[Tensor]) -> Tensor:
    """All datums' per-token values in one flat vector (sum over datums of sums over tokens = one sum)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _config_float(config: dict[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"loss_fn_config.{key}: expected a finite number, got {value!r}")
    return float(value)


def _clip_thresholds(config: dict[str, Any]) -> tuple[float, float]:
    low = _config_float(config, "clip_low_threshold", CLIP_LOW_THRESHOLD)
    high = _config_float(config, "clip_high_threshold", CLIP_HIGH_THRESHOLD)
    if low > high:
        raise UserError(f"loss_fn_config.clip_low_threshold: {low} is above clip_high_threshold {high}")
    return low, high


def _rl_inputs(target_logprobs: list[Tensor], loss_fn_inputs: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    lp = _cat(target_logprobs)  # (T_total,)
    slp = _cat([d["logprobs"] for d in loss_fn_inputs])  # (T_total,)
    advantages = _cat([d["advantages"] for d in loss_fn_inputs])  # (T_total,)
    return lp, slp, advantages


def _masked_mean(values: Tensor, mask: Tensor, empty: float) -> Tensor:
    count = mask.sum()
    return torch.where(
        count > 0, (values * mask).sum() / count.clamp_min(1), torch.full_like(count, empty, dtype=values.dtype)
    )


def _ratio_stats(ratio: Tensor, active: Tensor) -> dict[str, Tensor]:
    """mean/min/max of the ratio over tokens with a nonzero advantage (1.0 when there are none)."""
    one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
    if ratio.numel() == 0:
        return dict.fromkeys(RATIO_METRICS, one)
    any_active = active.any()
    return {
        "ratio:mean": _masked_mean(ratio, active, 1.0),
        "ratio:min": torch.where(any_active, ratio.masked_fill(~active, math.inf).min(), one),
        "ratio:max": torch.where(any_active, ratio.masked_fill(~active, -math.inf).max(), one),
    }


def _floats(metrics: dict[str, Tensor]) -> dict[str, float]:
    """Move all metric tensors to Python floats with one device sync."""
    if not metrics:
        return {}
    values = torch.stack([v.detach().to(torch.float32).reshape(()) for v in metrics.values()]).tolist()
    return dict(zip(metrics, values))


def cross_entropy(
    target_logprobs: list[Tensor], loss_fn_inputs: list[dict[str, Tensor]], config: dict[str, Any]
) -> tuple[Tensor, dict[str, float]]:
    """loss = (-target_logprobs * weights).sum()

    target_tokens (N,) or (N, K); weights (N,) or shaped like target_tokens, any sign, default ones.
    """
    lp = _cat(target_logprobs)
    weights = _cat(
        [d["weights"] if "weights" in d else torch.ones_like(t) for t, d in zip(target_logprobs, loss_fn_inputs)]
    )
    loss = (-lp * weights).sum()
    return loss, {}


def importance_sampling(
    target_logprobs: list[Tensor], loss_fn_inputs: list[dict[str, Tensor]], config: dict[str, Any]
) -> tuple[Tensor, dict[str, float]]:
    """loss = -(exp(lp - sampling_lp) * A).sum()"""
    lp, slp, advantages = _rl_inputs(target_logprobs, loss_fn_inputs)
    ratio = torch.exp(lp - slp)
    loss = -(ratio * advantages).sum()
    return loss, _floats(_ratio_stats(ratio.detach(), advantages != 0))


def ppo(
    target_logprobs: list[Tensor], loss_fn_inputs: list[dict[str, Tensor]], config: dict[str, Any]
) -> tuple[Tensor, dict[str, float]]:
    """r = exp(lp - slp); loss = -min(r·A, clamp(r, lo, hi)·A).sum()

    lo, hi = loss_fn_config clip_low_threshold / clip_high_threshold (default 0.8 / 1.2).
    """
    low, high = _clip_thresholds(config)
    lp, slp, advantages = _rl_inputs(target_logprobs, loss_fn_inputs)
    r = torch.exp(lp - slp)
    loss = -torch.minimum(r * advantages, torch.clamp(r, low, high) * advantages).sum()

    r, active = r.detach(), advantages != 0
    clipped = ((advantages > 0) & (r > high)) | (
        (advantages < 0) & (r < low)
    )  # the min picked the constant: no gradient
    return loss, _floats(
        {**_ratio_stats(r, active), "clip_fraction:mean": _masked_mean(clipped.to(r.dtype), active, 0.0)}
    )


def cispo(
    target_logprobs: list[Tensor], loss_fn_inputs: list[dict[str, Tensor]], config: dict[str, Any]
) -> tuple[Tensor, dict[str, float]]:
    """r = exp(lp - slp); loss = -(clamp(r, lo, hi).detach() * lp * A).sum()

    lo, hi as for ppo (default 0.8 / 1.2).
    """
    low, high = _clip_thresholds(config)
    lp, slp, advantages = _rl_inputs(target_logprobs, loss_fn_inputs)
    r = torch.exp(lp - slp)
    loss = -(torch.clamp(r, low, high).detach() * lp * advantages).sum()

    r, active = r.detach(), advantages != 0
    clipped = (r < low) | (r > high)
    return loss, _floats(
        {**_ratio_stats(r, active), "clip_fraction:mean": _masked_mean(clipped.to(r.dtype), active, 0.0)}
    )


def dro(
    target_logprobs: list[Tensor], loss_fn_inputs: list[dict[str, Tensor]], config: dict[str, Any]
) -> tuple[Tensor, dict[str, float]]:
    """loss = -(lp·A - 0.5·β·(lp - slp)²).sum()

    β = loss_fn_config beta (default 0.05, Tinkerbell's choice: the docs give none).
    """
    beta = _config_float(config, "beta", DRO_BETA)
    if beta < 0:
        raise UserError(f"loss_fn_config.beta: must be >= 0, got {beta}")
    lp, slp, advantages = _rl_inputs(target_logprobs, loss_fn_inputs)
    penalty = 0.5 * beta * (lp - slp) ** 2
    loss = -(lp * advantages - penalty).sum()

    ratio = torch.exp(lp.detach() - slp)
    return loss, _floats({**_ratio_stats(ratio, advantages != 0), "penalty:sum": penalty.detach().sum()})


def gspo(
    target_logprobs: list[Tensor], loss_fn_inputs: list[dict[str, Tensor]], config: dict[str, Any]
) -> tuple[Tensor, dict[str, float]]:
    """s = mean over masked tokens of (lp.detach() - slp), per sequence; r_t = exp(s + lp - lp.detach());
    loss = -min(r_t·A, clamp(r_t, lo, hi)·A).sum()

    Mask = sequence_ratio_mask (default ones: every target position); a sequence with an empty mask gets s = 0.
    lo, hi as for ppo (default 0.8 / 1.2).
    """
    low, high = _clip_thresholds(config)
    lp, slp, advantages = _rl_inputs(target_logprobs, loss_fn_inputs)
    mask = _cat(
        [
            d["sequence_ratio_mask"] if "sequence_ratio_mask" in d else torch.ones_like(t)
            for t, d in zip(target_logprobs, loss_fn_inputs)
        ]
    )

    lengths = torch.tensor([t.numel() for t in target_logprobs], device=lp.device)  # (B,)
    datum_of_token = torch.repeat_interleave(
        torch.arange(len(target_logprobs), device=lp.device), lengths
    )  # (T_total,)
    num = torch.zeros(len(target_logprobs), dtype=lp.dtype, device=lp.device).index_add_(
        0, datum_of_token, (lp.detach() - slp) * mask
    )  # (B,)
    den = torch.zeros_like(num).index_add_(0, datum_of_token, mask)  # (B,)
    seq_log_ratio = num / torch.where(den == 0, torch.ones_like(den), den)  # (B,); 0 where the mask is empty

    r = torch.exp(seq_log_ratio[datum_of_token] + lp - lp.detach())  # (T_total,): value exp(s), gradient through lp
    loss = -torch.minimum(r * advantages, torch.clamp(r, low, high) * advantages).sum()

    r, active = r.detach(), advantages != 0
    clipped = ((advantages > 0) & (r > high)) | ((advantages < 0) & (r < low))
    seq_ratio = torch.exp(seq_log_ratio)
    metrics = {
        "sequence_ratio:mean": seq_ratio.mean(),
        "sequence_ratio:min": seq_ratio.min(),
        "sequence_ratio:max": seq_ratio.max(),
        "clip_fraction:mean": _masked_mean(clipped.to(r.dtype), active, 0.0),
    }
    return loss, _floats(metrics)


_RL_INPUTS = ("logprobs", "advantages")
_CLIP_CONFIG = {"clip_low_threshold": CLIP_LOW_THRESHOLD, "clip_high_threshold": CLIP_HIGH_THRESHOLD}

# replace=True: re-importing this module (e.g. importlib.reload) re-registers the same functions.
register_loss("cross_entropy", cross_entropy, builtin=True, replace=True, optional_inputs=("weights",))
register_loss(
    "importance_sampling",
    importance_sampling,
    builtin=True,
    replace=True,
    required_inputs=_RL_INPUTS,
    metrics=RATIO_METRICS,
)
register_loss(
    "ppo",
    ppo,
    builtin=True,
    replace=True,
    required_inputs=_RL_INPUTS,
    config=_CLIP_CONFIG,
    metrics=(*RATIO_METRICS, "clip_fraction:mean"),
)
register_loss(
    "cispo",
    cispo,
    builtin=True,
    replace=True,
    required_inputs=_RL_INPUTS,
    config=_CLIP_CONFIG,
    metrics=(*RATIO_METRICS, "clip_fraction:mean"),
)
register_loss(
    "dro",
    dro,
    builtin=True,
    replace=True,
    required_inputs=_RL_INPUTS,
    config={"beta": DRO_BETA},
    metrics=(*RATIO_METRICS, "penalty:sum"),
)
register_loss(
    "gspo",
    gspo,
    builtin=True,
    replace=True,
    required_inputs=_RL_INPUTS,
    optional_inputs=("sequence_ratio_mask",),
    config=_CLIP_CONFIG,
    metrics=("sequence_ratio:mean", "sequence_ratio:min", "sequence_ratio:max", "clip_fraction:mean"),
)
