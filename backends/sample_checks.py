"""Torch-free checks of one sample request, shared by the HF and vLLM sampling backends (same UserError messages).

`validate` needs only the model's limits (vocab_in, vocab_out, max_len), so the vLLM venv runs it unchanged.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from backends.base import SampleRequest, SamplingSpec
from core.errors import UserError


class ModelLimits(Protocol):
    vocab_in: int  # input embedding rows: a prompt token must be below this
    vocab_out: int  # output logits: top-k prompt logprobs go up to this
    max_len: int | None  # context length (None: unknown, unchecked)


def plain_tokens(prompt: list[object]) -> list[object]:
    """numpy ints (anything with __index__ but not bool) as Python ints; other values left for validate to refuse."""
    return [int(t) if hasattr(t, "__index__") and not isinstance(t, bool) else t for t in prompt]  # type: ignore


def validate(
    prompt: list[int], params: SamplingSpec, num_samples: int, topk_prompt: int, limits: ModelLimits
) -> SamplingSpec:
    """The request's SamplingSpec with max_tokens an int and stop None or a list; UserError naming the bad field."""
    if not prompt:
        raise UserError("prompt: empty")
    for pos, tok in enumerate(prompt):
        if not isinstance(tok, int) or not 0 <= tok < limits.vocab_in:
            raise UserError(
                f"prompt: token id {tok!r} at position {pos} is outside the vocabulary [0, {limits.vocab_in})"
            )
    if not isinstance(num_samples, int) or num_samples < 1:
        raise UserError(f"num_samples: must be a positive integer, got {num_samples!r}")
    if not isinstance(topk_prompt, int) or not 0 <= topk_prompt <= limits.vocab_out:
        raise UserError(f"topk_prompt_logprobs: must be between 0 and {limits.vocab_out}, got {topk_prompt!r}")
    room = (limits.max_len - len(prompt)) if limits.max_len else None
    if room is not None and room < 0:
        raise UserError(f"prompt: {len(prompt)} tokens exceed the model's context length {limits.max_len}")
    max_tokens = params.max_tokens if params.max_tokens is not None else (room if room is not None else 16)
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise UserError(f"sampling_params.max_tokens: must be a non-negative integer, got {params.max_tokens!r}")
    if room is not None and max_tokens > room:
        raise UserError(
            f"sampling_params.max_tokens: prompt ({len(prompt)}) + max_tokens ({max_tokens}) exceeds the context "
            f"length {limits.max_len}"
        )
    t, p, k = params.temperature, params.top_p, params.top_k
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
        raise UserError(f"sampling_params.temperature: must be >= 0, got {t!r}")
    if not (isinstance(p, (int, float)) and 0 < p <= 1):
        raise UserError(f"sampling_params.top_p: must be in (0, 1], got {p!r}")
    if not isinstance(k, int) or k < -1:
        raise UserError(f"sampling_params.top_k: must be -1 (off) or a positive integer, got {k!r}")
    if params.seed is not None and not isinstance(params.seed, int):
        raise UserError(f"sampling_params.seed: must be an integer, got {params.seed!r}")
    stop = params.stop
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, (list, tuple)):
            raise UserError("sampling_params.stop: must be a string, a list of strings or a list of token ids")
        if not (
            all(isinstance(s, str) and s for s in stop)
            or all(isinstance(s, int) and not isinstance(s, bool) for s in stop)
        ):
            raise UserError("sampling_params.stop: must be all non-empty strings or all token ids")
        stop = list(stop)
    return SamplingSpec(
        max_tokens=max_tokens, temperature=float(t), top_p=float(p), top_k=k, seed=params.seed, stop=stop
    )


def validate_extras(request: SampleRequest, limits: ModelLimits) -> np.ndarray | None:
    """Check the request's topk_sample_logprobs, target_prompt_cells and prompt_alt_tokens_k (after `validate`);
    returns the target cells as an (n, 2) int64 array, or None. UserError naming the Tinker field."""
    k, alt_k = request.topk_sample_logprobs, request.prompt_alt_tokens_k
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= limits.vocab_out:
        raise UserError(f"topk_sample_logprobs: must be between 0 and {limits.vocab_out}, got {k!r}")
    if not isinstance(alt_k, int) or isinstance(alt_k, bool) or alt_k < 0:
        raise UserError(f"prompt_alt_tokens_k: must be 0 or greater, got {alt_k!r}")
    if request.target_prompt_cells is None:
        return None
    field = "target_prompt_logprobs"
    try:
        cells = np.asarray(request.target_prompt_cells, dtype=np.int64).reshape(-1, 2)  # (n, 2)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UserError(f"{field}: not a tensor of token ids ({exc})") from None
    rows = len(request.prompt) - 1
    if len(cells) and not ((cells[:, 0] >= 0) & (cells[:, 0] < rows)).all():
        raise UserError(f"{field}: needs exactly len(prompt) - 1 = {rows} rows (row i scores prompt position i + 1)")
    ids = cells[:, 1]
    if not (ids >= 0).any():
        raise UserError(f"{field}: names no token id (every cell is -1); send at least one")
    bad = ids[(ids < -1) | (ids >= limits.vocab_out)]
    if len(bad):
        raise UserError(
            f"{field}: token id {int(bad[0])} is outside the vocabulary [0, {limits.vocab_out}) (-1: no token)"
        )
    return cells
