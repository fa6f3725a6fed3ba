"""Arrays on the broker: plain dicts of bytes + dtype + shape (DESIGN rule 4: never lists of numbers, never pickle)."""

from __future__ import annotations

from typing import Any

import numpy as np

DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int32}


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


def encode_datum(tokens: Any, loss_fn_inputs: dict[str, Any]) -> dict[str, Any]:
    """A training example as it travels to a worker: model input tokens + named loss inputs."""
    return {
        "tokens": encode_array(tokens, "int64"),
        "loss_fn_inputs": {k: v if isinstance(v, dict) and "data" in v else encode_array(v) for k, v in loss_fn_inputs.items()},
    }


def decode_datum(payload: dict[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    return decode_array(payload["tokens"]), {k: decode_array(v) for k, v in payload["loss_fn_inputs"].items()}
