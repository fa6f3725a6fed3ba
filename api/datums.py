"""Arrays and datums as both faces decode them (JSON TensorData, protobuf Tensor): shapes, CSR, the checks api/
can do without the model. The faces only unpack their wire format; everything from numpy arrays on is here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from core.errors import UserError
from core.wire import decode_array, encode_array, encode_datum

MAX_TENSOR_BYTES = 1 << 30  # a dense tensor larger than this is refused before it is allocated


def shape_of(shape: Any, field: str, itemsize: int) -> list[int]:
    """A tensor's shape: non-negative integers whose dense size stays under MAX_TENSOR_BYTES."""
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise UserError(f"{field}.shape: must be a list of non-negative integers, got {shape!r:.80}")
    if math.prod(shape) * itemsize > MAX_TENSOR_BYTES:
        raise UserError(f"{field}.shape: {list(shape)} is larger than {MAX_TENSOR_BYTES} bytes")
    return list(shape)


def dense(values: np.ndarray, shape: list[int] | None, field: str) -> np.ndarray:
    """Dense values (flat) in `shape` (None: as they are)."""
    if shape is None:
        return values
    shape = shape_of(shape, field, values.itemsize)
    if math.prod(shape) != values.size:
        raise UserError(f"{field}: {values.size} values do not fill shape {shape}")
    return values.reshape(shape)


def dense_from_csr(
    values: np.ndarray, crow: np.ndarray, col: np.ndarray, shape: Any, field: str, max_bytes: int
) -> np.ndarray:
    """A 2-D sparse CSR matrix (values, crow_indices, col_indices) as a dense array of at most max_bytes
    (TINKERBELL_MAX_BODY_BYTES: a tiny sparse body must not make the API allocate more than a dense one could)."""
    shape = shape_of(shape, field, values.itemsize)
    if math.prod(shape) * values.itemsize > max_bytes:
        raise UserError(
            f"{field}.shape: {shape} is larger dense than the limit TINKERBELL_MAX_BODY_BYTES={max_bytes} bytes"
        )
    out = np.zeros(shape, dtype=values.dtype)
    out[csr_rows(values, crow, col, shape, field), col] = values
    return out


def csr_rows(values: np.ndarray, crow: np.ndarray, col: np.ndarray, shape: list[int], field: str) -> np.ndarray:
    """The row of each value of a 2-D sparse CSR matrix, (nnz,), once its indices are checked against `shape`."""
    if len(shape) != 2:
        raise UserError(f"{field}.shape: a sparse CSR tensor needs a 2-D shape, got {shape}")
    rows, cols = shape
    if crow.ndim != 1 or col.ndim != 1 or values.ndim != 1:
        raise UserError(f"{field}: CSR values and indices must be flat lists")
    if (
        len(crow) != rows + 1
        or crow[0] != 0
        or crow[-1] != len(values)
        or len(col) != len(values)
        or (np.diff(crow) < 0).any()
    ):
        raise UserError(f"{field}: crow_indices/col_indices do not describe {len(values)} values in a {shape} matrix")
    if len(col) and (col.min() < 0 or col.max() >= cols):
        raise UserError(f"{field}.col_indices: outside 0..{cols - 1}")
    return np.repeat(np.arange(rows), np.diff(crow))


def target_prompt_cells(
    ids: np.ndarray, shape: Any, prompt_len: int, max_ids: int, csr: tuple[np.ndarray, np.ndarray] | None = None
) -> dict[str, Any]:
    """Tinker's target_prompt_logprobs, int64 token ids [len(prompt) - 1, K] (dense: ids and shape; sparse CSR: its
    values, shape and (crow_indices, col_indices), absent cells asking for nothing), as the sample task carries it:
    {"cells": (m, 2) [row, token id] of the cells that name a token, "index": (m,) where each one's answer goes among
    the "size" values of the answer, "shape", and the CSR indices, to answer in the same layout} (api.jsonwire
    target_answer). Cells of -1 never reach the worker: their answer is 0.0.

    Checks what api/ can without the model: the shape, ids not below -1 (-1: no token), at least one id, and at most
    max_ids distinct ids (the cost, len(prompt) x distinct ids, bounded as a top-k width is)."""
    field = "target_prompt_logprobs"
    if not isinstance(shape, (list, tuple)) or len(shape) != 2 or not all(_count(s) for s in shape):
        raise UserError(f"{field}.shape: must be [len(prompt) - 1, K] = [{prompt_len - 1}, K], got {shape!r:.80}")
    shape = [int(s) for s in shape]
    if shape[0] != prompt_len - 1:
        raise UserError(
            f"{field}.shape: needs exactly len(prompt) - 1 = {prompt_len - 1} rows (row i scores prompt position "
            f"i + 1), got {shape[0]}"
        )
    layout: dict[str, Any] = {"shape": shape}
    if csr is None:
        if ids.size != math.prod(shape):
            raise UserError(f"{field}: {ids.size} values do not fill shape {shape}")
        rows = np.repeat(np.arange(shape[0]), shape[1])  # row-major, as the dense values come
    else:
        crow, col = csr
        rows = csr_rows(ids.reshape(-1), crow, col, shape, field)
        layout.update(crow_indices=encode_array(crow, "int64"), col_indices=encode_array(col, "int64"))
    ids = ids.reshape(-1)
    if len(ids) and ids.min() < -1:
        raise UserError(f"{field}: token id {int(ids.min())} is negative (-1 is the only cell that asks for nothing)")
    distinct = np.unique(ids[ids >= 0])
    if not len(distinct):
        raise UserError(f"{field}: names no token id (every cell is -1); send at least one")
    if len(distinct) > max_ids:
        raise UserError(f"{field}: {len(distinct)} distinct token ids; at most {max_ids}, the top-k limit")
    named = np.flatnonzero(ids >= 0)  # (m,)
    cells = np.stack([rows[named], ids[named]], axis=1)  # (m, 2)
    return {
        **layout,
        "size": len(ids),
        "index": encode_array(named, "int64"),
        "cells": encode_array(cells, "int64"),
    }


def target_answer(payload: dict[str, Any]) -> tuple[np.ndarray, list[int], np.ndarray | None, np.ndarray | None]:
    """A sample result's target_prompt_logprobs (tasks.sampling) -> (float32 values, shape, crow, col): the values of
    a dense [R, K] answer in row-major order (crow and col None), or of a sparse one's cells in CSR order."""
    values = np.zeros(int(payload["size"]), dtype=np.float32)
    values[decode_array(payload["index"])] = decode_array(payload["values"])
    crow, col = payload.get("crow_indices"), payload.get("col_indices")
    return values, list(payload["shape"]), decode_array(crow) if crow else None, decode_array(col) if col else None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_tokens(tokens: np.ndarray, field: str) -> None:
    """A model input or prompt: a non-empty flat list of non-negative token ids (the vocabulary is the worker's)."""
    if tokens.ndim != 1 or len(tokens) == 0:
        raise UserError(f"{field}: must be a non-empty list of tokens")
    if (tokens < 0).any():
        raise UserError(f"{field}: token ids must not be negative")


def check_datum(tokens: np.ndarray, inputs: dict[str, np.ndarray], index: int) -> None:
    """Shape checks api/ can do without the model: every per-token input has the input's length."""
    field = f"data[{index}]"
    check_tokens(tokens, f"{field}.model_input")
    for name, arr in inputs.items():
        if arr.ndim == 0 or arr.shape[0] != len(tokens):
            length = arr.shape[0] if arr.ndim else 0
            raise UserError(
                f"{field}.loss_fn_inputs.{name}: length {length} differs from model_input length {len(tokens)}"
            )
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise UserError(f"{field}.loss_fn_inputs.{name}: contains NaN or infinity")
    target = inputs.get("target_tokens")
    if target is not None and (target < 0).any():
        raise UserError(f"{field}.loss_fn_inputs.target_tokens: token ids must not be negative")
    weights = inputs.get("weights")
    if target is not None and weights is not None and weights.shape != target.shape[: weights.ndim]:
        shapes = f"{list(weights.shape)} does not match target_tokens {list(target.shape)}"
        raise UserError(f"{field}.loss_fn_inputs.weights: shape {shapes}")


def checked_datum(tokens: np.ndarray, inputs: dict[str, np.ndarray], index: int) -> dict[str, Any]:
    """check_datum, then the datum as it travels to a worker (core.wire.encode_datum)."""
    check_datum(tokens, inputs, index)
    return encode_datum(tokens, inputs)
