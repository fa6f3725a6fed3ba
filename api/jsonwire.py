"""JSON on the HTTP side: request datums/prompts in (Tinker TensorData and plain lists), results out.

Arrays leave here as core.wire payloads (bytes), the form tasks carry; results come back the same way.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flask import request

from core.errors import UserError
from core.wire import decode_array, encode_array


def body() -> dict[str, Any]:
    payload = request.get_json(force=True, silent=False)
    if not isinstance(payload, dict):
        raise UserError("body: must be a JSON object")
    return payload


def required(payload: dict[str, Any], name: str) -> Any:
    if payload.get(name) is None:
        raise UserError(f"{name}: required")
    return payload[name]


def tensor_from_json(value: Any, field: str, default_dtype: str) -> np.ndarray:
    """Tinker TensorData {data, dtype, shape?, sparse_crow_indices?, sparse_col_indices?} or a (nested) list."""
    try:
        if isinstance(value, dict):
            dtype = value.get("dtype", default_dtype)
            if dtype not in ("float32", "int64", "int32"):
                raise UserError(f"{field}.dtype: must be float32 or int64, got {dtype!r}")
            data = np.asarray(value.get("data", []), dtype=np.float32 if dtype == "float32" else np.int64)
            shape = value.get("shape")
            if value.get("sparse_crow_indices") is not None:
                crow = np.asarray(value["sparse_crow_indices"], dtype=np.int64)
                col = np.asarray(value["sparse_col_indices"], dtype=np.int64)
                if not shape or len(shape) != 2:
                    raise UserError(f"{field}.shape: a sparse tensor needs a 2-D shape")
                dense = np.zeros(shape, dtype=data.dtype)
                for row in range(shape[0]):
                    dense[row, col[crow[row] : crow[row + 1]]] = data[crow[row] : crow[row + 1]]
                return dense
            return data.reshape(shape) if shape else data
        arr = np.asarray(value, dtype=np.float32 if default_dtype == "float32" else np.int64)
        return arr
    except UserError:
        raise
    except (ValueError, TypeError) as exc:
        raise UserError(f"{field}: not a valid tensor ({exc})") from None


DEFAULT_DTYPES = {"target_tokens": "int64"}


def tokens_from_json(value: Any, field: str) -> np.ndarray:
    """model_input as a list of ints, or Tinker ModelInput {chunks:[{type:"encoded_text", tokens}]}."""
    if isinstance(value, dict) and "chunks" in value:
        parts = []
        for i, chunk in enumerate(value["chunks"]):
            if chunk.get("type", "encoded_text") != "encoded_text":
                raise UserError(f"{field}.chunks[{i}]: only encoded_text chunks are supported, got {chunk.get('type')!r}")
            parts.extend(chunk.get("tokens", []))
        value = parts
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise UserError(f"{field}: must be a list of token ids (integers)")
    return np.asarray(value, dtype=np.int64)


def check_datum(tokens: np.ndarray, inputs: dict[str, np.ndarray], index: int) -> None:
    """Shape checks api/ can do without the model: every per-token input has the input's length."""
    field = f"data[{index}]"
    if tokens.ndim != 1 or len(tokens) == 0:
        raise UserError(f"{field}.model_input: must be a non-empty list of tokens")
    if (tokens < 0).any():
        raise UserError(f"{field}.model_input: token ids must not be negative")
    for name, arr in inputs.items():
        if arr.ndim == 0 or arr.shape[0] != len(tokens):
            raise UserError(f"{field}.loss_fn_inputs.{name}: length {arr.shape[0] if arr.ndim else 0} differs from model_input length {len(tokens)}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise UserError(f"{field}.loss_fn_inputs.{name}: contains NaN or infinity")
    target = inputs.get("target_tokens")
    if target is not None and (target < 0).any():
        raise UserError(f"{field}.loss_fn_inputs.target_tokens: token ids must not be negative")
    weights = inputs.get("weights")
    if target is not None and weights is not None and weights.shape != target.shape[: weights.ndim]:
        raise UserError(f"{field}.loss_fn_inputs.weights: shape {list(weights.shape)} does not match target_tokens {list(target.shape)}")


def datums_from_json(data: Any) -> list[dict[str, Any]]:
    if not isinstance(data, list):
        raise UserError("data: must be a list of datums")
    if not data:
        raise UserError("data: empty batch; send at least one datum")
    out = []
    for i, datum in enumerate(data):
        if not isinstance(datum, dict):
            raise UserError(f"data[{i}]: must be an object with model_input and loss_fn_inputs")
        tokens = tokens_from_json(datum.get("model_input", datum.get("tokens")), f"data[{i}].model_input")
        raw_inputs = datum.get("loss_fn_inputs") or {}
        if not isinstance(raw_inputs, dict):
            raise UserError(f"data[{i}].loss_fn_inputs: must be an object")
        inputs = {k: tensor_from_json(v, f"data[{i}].loss_fn_inputs.{k}", DEFAULT_DTYPES.get(k, "float32")) for k, v in raw_inputs.items()}
        check_datum(tokens, inputs, i)
        out.append(wire_datum(tokens, inputs))
    return out


def wire_datum(tokens: np.ndarray, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    return {"tokens": encode_array(tokens, "int64"), "loss_fn_inputs": {k: encode_array(v, "int64" if v.dtype.kind in "iu" else "float32") for k, v in inputs.items()}}


def _clean(values: list) -> list:
    return [None if isinstance(v, float) and math.isnan(v) else v for v in values]


def tensor_json(payload: dict[str, Any]) -> dict[str, Any]:
    arr = decode_array(payload)
    return {"data": _clean(arr.reshape(-1).tolist()), "dtype": payload["dtype"], "shape": list(arr.shape)}


def result_json(kind: str, result: Any) -> Any:
    """A finished task's result as JSON (arrays as TensorData or plain lists)."""
    if kind in ("forward_backward", "forward"):
        return {
            "loss_fn_output_type": result.get("loss_fn_output_type", "ArrayRecord"),
            "loss_fn_outputs": [{k: tensor_json(v) for k, v in out.items()} for out in result["loss_fn_outputs"]],
            "metrics": result["metrics"],
        }
    if kind == "sample":
        return {
            "type": "sample",
            "sequences": [
                {"tokens": decode_array(s["tokens"]).tolist(), "logprobs": decode_array(s["logprobs"]).tolist(), "stop_reason": s["stop_reason"]}
                for s in result["sequences"]
            ],
            "prompt_logprobs": _clean(decode_array(result["prompt_logprobs"]).tolist()) if result.get("prompt_logprobs") else None,
            "topk_prompt_logprobs": result.get("topk_prompt_logprobs"),
        }
    return result
