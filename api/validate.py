"""Field rules both API faces share: each check refuses a bad value with a UserError that names the field.

The native and Tinker blueprints, and api.service, take every typed field through these, so one rule has one home
(DESIGN rule 7: a request that can never succeed is a 4xx naming the field, never a bare 500).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from backends.base import AdamSpec, LoraSpec, SamplingSpec
from core.errors import UserError

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1
MAX_SEQ_ID = INT32_MAX  # the Tinker protobuf carries seq_id as int32; JSON gets the same range
MAX_TTL_S = 100 * 365 * 86400  # an expiry past this is no expiry, and overflows dates
MAX_SAMPLES = 1024
MAX_TOPK = 1024
MAX_NESTING = 32


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(value: Any, field: str, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """An integer (JSON true/false and 1.0 are not) in minimum..maximum."""
    if not _is_int(value) or not minimum <= value <= maximum:
        raise UserError(f"{field}: must be an integer in {minimum}..{maximum}, got {value!r:.80}")
    return value


def optional_integer(value: Any, field: str, minimum: int = 0, maximum: int = INT64_MAX) -> int | None:
    return None if value is None else integer(value, field, minimum, maximum)


def seq_id(value: Any) -> int | None:
    """A request's place in its model's order: 1, 2, …; None lets the service number it."""
    return optional_integer(value, "seq_id", 1, MAX_SEQ_ID)


def ttl_seconds(value: Any) -> int | None:
    return optional_integer(value, "ttl_seconds", 1, MAX_TTL_S)


def number(value: Any, field: str) -> float:
    """A finite JSON number (true/false are not numbers)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise UserError(f"{field}: must be a finite number, got {value!r:.80}")
    return float(value)


def boolean(value: Any, field: str, default: bool = False) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise UserError(f"{field}: must be true or false, got {value!r:.80}")
    return value


def string(value: Any, field: str) -> str:
    """A required, non-empty string."""
    if not isinstance(value, str) or not value:
        raise UserError(f"{field}: required, a non-empty string" + ("" if value is None else f", got {value!r:.80}"))
    return value


def optional_string(value: Any, field: str) -> str | None:
    return None if value is None else string(value, field)


def mapping(value: Any, field: str) -> dict[str, Any]:
    """A JSON object; null is the empty one."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{field}: must be an object, got {type(value).__name__}")
    return value


def metadata(value: Any, field: str = "user_metadata") -> dict[str, str] | None:
    if value is not None and (
        not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    ):
        raise UserError(f"{field}: must be an object of strings")
    return value


def plain(value: Any, field: str, depth: int = 0) -> Any:
    """Data a task may carry as it is (loss_fn_config): strings, booleans, null, int64 integers, finite numbers,
    and lists and objects of those."""
    if depth > MAX_NESTING:
        raise UserError(f"{field}: nested deeper than {MAX_NESTING}")
    if value is None or isinstance(value, (str, bool)):
        return value
    if _is_int(value):
        return integer(value, field, -INT64_MAX - 1, INT64_MAX)
    if isinstance(value, float):
        return number(value, field)
    if isinstance(value, list):
        return [plain(v, f"{field}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: plain(v, f"{field}.{k}", depth + 1) for k, v in value.items()}
    raise UserError(f"{field}: {type(value).__name__} is not plain data")


# ---- specs: request JSON -> the backend's plain dataclasses --------------------------------------
def _given(cls: type, values: Any, field: str) -> dict[str, Any]:
    """`cls`'s defaults overlaid with what the object sets (unknown keys and nulls are ignored: clients send extras)."""
    given = asdict(cls())
    given.update((k, v) for k, v in mapping(values, field).items() if k in given and v is not None)
    return given


def lora_spec(values: Any) -> LoraSpec:
    given = _given(LoraSpec, values, "lora_config")
    spec = LoraSpec(
        rank=integer(given["rank"], "lora_config.rank", 1, 1024),
        alpha=number(given["alpha"], "lora_config.alpha"),
        seed=optional_integer(given["seed"], "lora_config.seed", 0, UINT64_MAX),
        train_attn=boolean(given["train_attn"], "lora_config.train_attn"),
        train_mlp=boolean(given["train_mlp"], "lora_config.train_mlp"),
        train_unembed=boolean(given["train_unembed"], "lora_config.train_unembed"),
    )
    if spec.alpha <= 0:
        raise UserError(f"lora_config.alpha: must be positive, got {spec.alpha}")
    if not (spec.train_attn or spec.train_mlp or spec.train_unembed):
        raise UserError("lora_config: at least one of train_attn, train_mlp, train_unembed must be true")
    return spec


def adam_spec(values: Any) -> AdamSpec:
    spec = AdamSpec(**{k: number(v, f"adam_params.{k}") for k, v in _given(AdamSpec, values, "adam_params").items()})
    if not spec.learning_rate > 0:
        raise UserError(f"adam_params.learning_rate: must be positive, got {spec.learning_rate}")
    if not (0 <= spec.beta1 < 1 and 0 <= spec.beta2 < 1):
        raise UserError("adam_params.beta1/beta2: must be in [0, 1)")
    if not spec.eps > 0:
        raise UserError(f"adam_params.eps: must be positive (it divides the step), got {spec.eps}")
    if spec.weight_decay < 0 or spec.grad_clip_norm < 0:
        raise UserError("adam_params: weight_decay and grad_clip_norm must not be negative")
    return spec


def sampling_spec(values: Any) -> SamplingSpec:
    given = _given(SamplingSpec, values, "sampling_params")
    spec = SamplingSpec(
        max_tokens=integer(given["max_tokens"], "sampling_params.max_tokens", 1, INT32_MAX),
        temperature=number(given["temperature"], "sampling_params.temperature"),
        top_p=number(given["top_p"], "sampling_params.top_p"),
        top_k=integer(given["top_k"], "sampling_params.top_k", -1, INT32_MAX),
        seed=optional_integer(given["seed"], "sampling_params.seed", 0, UINT64_MAX),
        stop=_stop(given["stop"]),
    )
    if spec.temperature < 0:
        raise UserError(f"sampling_params.temperature: must not be negative, got {spec.temperature}")
    if not 0 < spec.top_p <= 1:
        raise UserError(f"sampling_params.top_p: must be in (0, 1], got {spec.top_p}")
    return spec


def _stop(stop: Any) -> list[str] | list[int] | None:
    """None (stop at EOS), one string, or a list of strings or of token ids."""
    if stop is None:
        return None
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    if isinstance(stop, list) and all(_is_int(s) and 0 <= s <= INT32_MAX for s in stop):
        return stop
    raise UserError("sampling_params.stop: must be a string, a list of strings or a list of token ids")
