"""JSON on the HTTP side: request datums/prompts in (Tinker TensorData and plain lists), results out.

Arrays leave here as core.wire payloads (bytes), the form tasks carry; results come back the same way.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flask import request

from api.datums import checked_datum, dense, dense_from_csr, target_answer, target_prompt_cells
from api.limits import body_limit
from api.validate import mapping, string
from core.errors import UserError
from core.wire import TOPK_EMPTY, decode_array, decode_topk

NP_DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int64}  # int32 widens to the wire's int64
DEFAULT_DTYPES = {"target_tokens": "int64"}


def body() -> dict[str, Any]:
    try:
        payload = request.get_json(force=True, silent=False)
    except RecursionError:
        raise UserError("body: JSON nested too deeply") from None
    if not isinstance(payload, dict):
        raise UserError("body: must be a JSON object")
    return payload


def required(payload: dict[str, Any], name: str) -> str:
    """A field every request of its kind names (model_id, request_id, path, …): a non-empty string."""
    return string(payload.get(name), name)


def _numbers(value: Any, field: str, dtype: str) -> np.ndarray:
    """A (nested) JSON list of numbers as a numpy array."""
    try:
        return np.asarray(value, dtype=NP_DTYPES[dtype])
    except (ValueError, TypeError, OverflowError) as exc:
        raise UserError(f"{field}: not a valid tensor ({exc})") from None


def tensor_from_json(value: Any, field: str, default_dtype: str) -> np.ndarray:
    """Tinker TensorData {data, dtype, shape?, sparse_crow_indices?, sparse_col_indices?} or a (nested) list."""
    if not isinstance(value, dict):
        return _numbers(value, field, default_dtype)
    dtype = value.get("dtype", default_dtype)
    if not isinstance(dtype, str) or dtype not in NP_DTYPES:
        raise UserError(f"{field}.dtype: must be float32 or int64, got {dtype!r:.80}")
    data = _numbers(value.get("data", []), f"{field}.data", dtype)
    if value.get("sparse_crow_indices") is not None:
        crow = _numbers(value["sparse_crow_indices"], f"{field}.sparse_crow_indices", "int64")
        col = _numbers(value.get("sparse_col_indices"), f"{field}.sparse_col_indices", "int64")
        return dense_from_csr(data, crow, col, value.get("shape"), field, body_limit())
    return dense(data, value.get("shape") or None, field)


def target_prompt_from_json(value: Any, prompt_len: int, max_ids: int) -> dict[str, Any] | None:
    """target_prompt_logprobs: Tinker TensorData of int64 token ids [len(prompt) - 1, K], dense or sparse CSR (cells it
    does not list ask for nothing, as -1 does), or a nested list; None when absent (api.datums.target_prompt_cells)."""
    field = "target_prompt_logprobs"
    if value is None:
        return None
    if not isinstance(value, dict):
        ids = _numbers(value, field, "int64")
        return target_prompt_cells(ids, list(ids.shape), prompt_len, max_ids)
    if value.get("dtype", "int64") not in ("int64", "int32"):
        raise UserError(f"{field}.dtype: must be int64 (token ids), got {value.get('dtype')!r:.80}")
    ids = _numbers(value.get("data", []), f"{field}.data", "int64")
    if value.get("sparse_crow_indices") is None:
        return target_prompt_cells(ids, value.get("shape"), prompt_len, max_ids)
    crow = _numbers(value["sparse_crow_indices"], f"{field}.sparse_crow_indices", "int64")
    col = _numbers(value.get("sparse_col_indices"), f"{field}.sparse_col_indices", "int64")
    return target_prompt_cells(ids, value.get("shape"), prompt_len, max_ids, (crow, col))


def tokens_from_json(value: Any, field: str) -> np.ndarray:
    """model_input as a list of ints, or Tinker ModelInput {chunks:[{type:"encoded_text", tokens}]}."""
    if isinstance(value, dict) and "chunks" in value:
        chunks = value["chunks"]
        if not isinstance(chunks, list):
            raise UserError(f"{field}.chunks: must be a list of chunks")
        parts: list[Any] = []
        for i, chunk in enumerate(chunks):
            chunk = mapping(chunk, f"{field}.chunks[{i}]")
            if chunk.get("type", "encoded_text") != "encoded_text":
                raise UserError(
                    f"{field}.chunks[{i}]: only encoded_text chunks are supported, got {chunk.get('type')!r:.80}"
                )
            tokens = chunk.get("tokens", [])
            if not isinstance(tokens, list):
                raise UserError(f"{field}.chunks[{i}].tokens: must be a list of token ids (integers)")
            parts.extend(tokens)
        value = parts
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise UserError(f"{field}: must be a list of token ids (integers)")
    return _numbers(value, field, "int64")


def datums_from_json(data: Any) -> list[dict[str, Any]]:
    """The datums of a JSON fwd/bwd request, checked (api.datums.check_datum), as core.wire payloads."""
    if not isinstance(data, list):
        raise UserError("data: must be a list of datums")
    out = []
    for i, datum in enumerate(data):
        if not isinstance(datum, dict):
            raise UserError(f"data[{i}]: must be an object with model_input and loss_fn_inputs")
        tokens = tokens_from_json(datum.get("model_input", datum.get("tokens")), f"data[{i}].model_input")
        raw_inputs = mapping(datum.get("loss_fn_inputs"), f"data[{i}].loss_fn_inputs")
        inputs = {
            k: tensor_from_json(v, f"data[{i}].loss_fn_inputs.{k}", DEFAULT_DTYPES.get(k, "float32"))
            for k, v in raw_inputs.items()
        }
        out.append(checked_datum(tokens, inputs, i))
    return out


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
        answer = {
            "type": "sample",
            "sequences": [
                {
                    "tokens": decode_array(s["tokens"]).tolist(),
                    "logprobs": decode_array(s["logprobs"]).tolist(),
                    "stop_reason": s["stop_reason"],
                    **({"topk_logprobs": topk_json(s["topk_logprobs"])} if s.get("topk_logprobs") else {}),
                }
                for s in result["sequences"]
            ],
            "prompt_logprobs": _clean(decode_array(result["prompt_logprobs"]).tolist())
            if result.get("prompt_logprobs")
            else None,
            "topk_prompt_logprobs": topk_json(result.get("topk_prompt_logprobs")),
        }
        if result.get("target_prompt_logprobs"):
            answer["target_prompt_logprobs"] = target_json(result["target_prompt_logprobs"])
        if result.get("prompt_alt_tokens"):
            alt = result["prompt_alt_tokens"]
            answer["prompt_alt_tokens"] = {
                "tokens": tensor_json(alt["tokens"]),
                "logprobs": tensor_json(alt["logprobs"]),
            }
        return answer
    return result


def target_json(payload: dict[str, Any]) -> dict[str, Any]:
    """A result's target_prompt_logprobs as Tinker TensorData, float32, in the request's layout (dense or CSR)."""
    values, shape, crow, col = target_answer(payload)
    out: dict[str, Any] = {"data": values.tolist(), "dtype": "float32", "shape": shape}
    if crow is not None and col is not None:
        out.update(sparse_crow_indices=crow.tolist(), sparse_col_indices=col.tolist())
    return out


def topk_json(payload: dict[str, Any] | list | None) -> list[list[list[float]]] | None:
    """Top-k prompt logprobs (core.wire.decode_topk) as the Tinker JSON shape: per position [[token, logprob], …]."""
    if payload is None:
        return None
    tokens, logprobs = decode_topk(payload)
    return [[[int(t), float(lp)] for t, lp in zip(ids, lps) if t != TOPK_EMPTY] for ids, lps in zip(tokens, logprobs)]
