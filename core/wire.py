"""Arrays on the broker: plain dicts of bytes + dtype + shape (DESIGN rule 4: never lists of numbers, never pickle)."""

from __future__ import annotations

from typing import Any

import numpy as np

DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int32}
TOPK_EMPTY = -1  # token id of a top-k cell with no candidate (position 0, or fewer than k candidates)


def encode_array(array: Any, dtype: str | None = None) -> dict[str, Any]:
    """numpy-able value -> {"data": bytes, "dtype": str, "shape": [int]} (little-endian)."""
    arr = np.asarray(array)
    if dtype is None:
        dtype = "float32" if arr.dtype.kind == "f" else "int64"
    arr = np.ascontiguousarray(arr, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<"))
    return {"data": arr.tobytes(), "dtype": dtype, "shape": list(arr.shape)}


def decode_array(payload: dict[str, Any]) -> np.ndarray:
    """Inverse of encode_array; returns a writable native-order array."""
    dtype = np.dtype(DTYPES[payload["dtype"]]).newbyteorder("<")
    arr = np.frombuffer(payload["data"], dtype=dtype).reshape(payload["shape"])
    return arr.astype(arr.dtype.newbyteorder("="), copy=True)


def encode_datum(tokens: np.ndarray, loss_fn_inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """A training example as it travels to a worker: model input tokens (int64) + named loss inputs
    (integers as int64, everything else as float32)."""
    return {
        "tokens": encode_array(tokens, "int64"),
        "loss_fn_inputs": {k: encode_array(v) for k, v in loss_fn_inputs.items()},
    }


def decode_datum(payload: dict[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    return decode_array(payload["tokens"]), {k: decode_array(v) for k, v in payload["loss_fn_inputs"].items()}


def encode_topk(rows: list[list[tuple[int, float]]]) -> dict[str, Any]:
    """Top-k prompt logprobs, k (token, logprob) per position (position 0 has none), as two [positions, k] arrays.

    {"tokens": int64 [N, k], "logprobs": float32 [N, k], "k": k}; an empty cell has token TOPK_EMPTY (-1).
    """
    k = max((len(row) for row in rows), default=0)
    tokens = np.full((len(rows), k), TOPK_EMPTY, dtype=np.int64)
    logprobs = np.zeros((len(rows), k), dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (token, logprob) in enumerate(row):
            tokens[i, j], logprobs[i, j] = token, logprob
    return {"tokens": encode_array(tokens, "int64"), "logprobs": encode_array(logprobs, "float32"), "k": k}


def decode_topk(payload: dict[str, Any] | list) -> tuple[np.ndarray, np.ndarray]:
    """encode_topk's form, or the older nested list [[[token, logprob], …] per position] -> (tokens, logprobs),
    both [N, k], empty cells with token TOPK_EMPTY."""
    if isinstance(payload, list):
        payload = encode_topk(payload)
    return decode_array(payload["tokens"]), decode_array(payload["logprobs"])
