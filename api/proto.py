"""Protobuf on the Tinker face, with the SDK's own `tinker_public_pb2`: ForwardBackwardRequest in, results out.

Requests become core.wire datums (validated like the JSON ones); task results become ForwardBackwardOutput /
SampleResponse bytes. No torch here (DESIGN rule 1).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from tinker.proto import tinker_public_pb2 as pb

from api.jsonwire import check_datum, wire_datum
from core.errors import UserError
from core.wire import decode_array

PROTO_CONTENT_TYPE = "application/x-protobuf"
MAX_BODY_BYTES = 1 << 30  # a decompressed fwd/bwd body larger than this is refused, not buffered

_NP_OF = {pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_INT64: np.dtype("<i8"), pb.DTYPE_INT32: np.dtype("<i4")}
_PB_OF = {"float32": pb.DTYPE_FLOAT32, "int64": pb.DTYPE_INT64, "int32": pb.DTYPE_INT32}
VALID_REDUCTIONS = ("mean", "sum", "min", "max", "slack", "hash2", "unique")
_TOPK_EMPTY_LOGPROB = -99999.0


def decompress(body: bytes, content_encoding: str | None) -> bytes:
    """Undo `Content-Encoding: zstd` (the SDK sends it when client/config says proto_compress_fwdbwd)."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "zstd":
        raise UserError(f"Content-Encoding: {content_encoding!r} is not supported (send zstd or none)")
    import zstandard

    try:
        with zstandard.ZstdDecompressor().stream_reader(body) as reader:
            out = reader.read(MAX_BODY_BYTES + 1)
    except zstandard.ZstdError as exc:
        raise UserError(f"body: not valid zstd ({exc})") from None
    if len(out) > MAX_BODY_BYTES:
        raise UserError(f"body: larger than {MAX_BODY_BYTES} bytes after decompression")
    return out


def _tensor(msg: pb.Tensor, field: str) -> np.ndarray:
    """A proto Tensor (dense or CSR) as a dense numpy array."""
    dtype = _NP_OF.get(msg.dtype)
    if dtype is None:
        raise UserError(f"{field}.dtype: must be float32 or int64, got {pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else msg.dtype}")
    shape = [int(s) for s in msg.shape]
    try:
        if msg.HasField("sparse_csr"):
            values = np.frombuffer(msg.sparse_csr.values, dtype=dtype)
            crow = np.frombuffer(msg.sparse_csr.crow_indices, dtype="<i8")
            col = np.frombuffer(msg.sparse_csr.col_indices, dtype="<i8")
            if len(shape) != 2:
                raise UserError(f"{field}.shape: a sparse CSR tensor needs a 2-D shape, got {shape}")
            rows, cols = shape
            if len(crow) != rows + 1 or crow[0] != 0 or crow[-1] != len(values) or len(col) != len(values) or (np.diff(crow) < 0).any():
                raise UserError(f"{field}.sparse_csr: crow_indices/col_indices do not describe {len(values)} values in a {shape} matrix")
            if len(col) and (col.min() < 0 or col.max() >= cols):
                raise UserError(f"{field}.sparse_csr.col_indices: outside 0..{cols - 1}")
            dense = np.zeros(shape, dtype=dtype.newbyteorder("="))
            row_of = np.repeat(np.arange(rows), np.diff(crow))
            dense[row_of, col] = values
            return dense
        arr = np.frombuffer(msg.dense, dtype=dtype)
        if shape:
            if math.prod(shape) != arr.size:
                raise UserError(f"{field}: {arr.size} values do not fill shape {shape}")
            arr = arr.reshape(shape)
        return arr.astype(dtype.newbyteorder("="))
    except ValueError as exc:
        raise UserError(f"{field}: not a valid tensor ({exc})") from None


def _tokens(datum: pb.Datum, field: str) -> np.ndarray:
    parts = []
    for i, chunk in enumerate(datum.model_input):
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise UserError(f"{field}.model_input.chunks[{i}]: only encoded_text chunks are supported, got {kind or 'an empty chunk'}")
        if len(chunk.encoded_text.tokens) % 4:
            raise UserError(f"{field}.model_input.chunks[{i}].tokens: length is not a multiple of 4 bytes (int32)")
        parts.append(np.frombuffer(chunk.encoded_text.tokens, dtype="<i4"))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def loss_config(msg: pb.ForwardBackwardRequest) -> dict[str, Any]:
    """loss_fn_config_v2 (numbers and strings) wins over the legacy numbers-only map."""
    config: dict[str, Any] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        kind = value.WhichOneof("value")
        if kind == "number":
            config[key] = float(value.number)
        elif kind == "text":
            config[key] = value.text
    return config


def parse_forward_backward(body: bytes) -> pb.ForwardBackwardRequest:
    """Decode a ForwardBackwardRequest (its datums are checked by `wire_datums`)."""
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise UserError(f"body: not a tinker_public.ForwardBackwardRequest protobuf ({exc})") from None
    if not msg.model_id:
        raise UserError("model_id: required")
    return msg


def wire_datums(msg: pb.ForwardBackwardRequest) -> list[dict[str, Any]]:
    """The request's datums, validated like the JSON ones, as core.wire payloads."""
    if not msg.data:
        raise UserError("data: empty batch; send at least one datum")
    datums = []
    for i, datum in enumerate(msg.data):
        field = f"data[{i}]"
        tokens = _tokens(datum, field)
        inputs = {name: _tensor(tensor, f"{field}.loss_fn_inputs.{name}") for name, tensor in datum.loss_fn_inputs.items()}
        check_datum(tokens, inputs, i)
        datums.append(wire_datum(tokens, inputs))
    return datums


def metric_key(key: str) -> str:
    """The SDK splits every metric key on its one ':' (name:reduction); make any other key fit that."""
    name, _, reduction = key.rpartition(":")
    if not name:
        return f"{key.replace(':', '_') or 'metric'}:mean"
    return f"{name.replace(':', '_')}:{reduction}"


def forward_backward_output(result: dict[str, Any]) -> bytes:
    """Task result {loss_fn_outputs:[{name: wire array}], metrics} → ForwardBackwardOutput bytes.

    Datums that share field names, dtypes and trailing shapes go into one ArrayRecord (usually all of them);
    a change starts a new record, which the SDK concatenates back in order.
    """
    out = pb.ForwardBackwardOutput(loss_fn_output_type=result.get("loss_fn_output_type") or "ArrayRecord")
    for key, value in (result.get("metrics") or {}).items():
        out.metrics[metric_key(str(key))] = float(value)
    groups: list[tuple[tuple, list[dict[str, np.ndarray]]]] = []
    for item in result.get("loss_fn_outputs") or []:
        arrays = {name: decode_array(payload) for name, payload in item.items()}
        signature = tuple(sorted((name, payload["dtype"], tuple(arrays[name].shape[1:])) for name, payload in item.items()))
        if groups and groups[-1][0] == signature:
            groups[-1][1].append(arrays)
        else:
            groups.append((signature, [arrays]))
    for signature, items in groups:
        record = out.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(items))
        for name, dtype, trailing in signature:
            np_dtype = _NP_OF[_PB_OF[dtype]]
            chunks = [np.ascontiguousarray(arrays[name], dtype=np_dtype).tobytes() for arrays in items]
            offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype("<i8")
            batched = record.fields[name]
            batched.data = b"".join(chunks)
            batched.offsets = offsets.tobytes()
            batched.dtype = _PB_OF[dtype]
            batched.trailing_shape.extend(int(s) for s in trailing)
    return out.SerializeToString()


def _topk(rows: list[list[list[float]]]) -> pb.TopkLogprobs:
    """Ragged [[token, logprob], …] per position → N×K arrays, empty cells 0 / -99999."""
    k = max((len(row) for row in rows), default=0)
    ids = np.zeros((len(rows), k), dtype="<i4")
    logprobs = np.full((len(rows), k), _TOPK_EMPTY_LOGPROB, dtype="<f4")
    for i, row in enumerate(rows):
        for j, (token, logprob) in enumerate(row):
            ids[i, j], logprobs[i, j] = int(token), float(logprob)
    return pb.TopkLogprobs(token_ids=ids.tobytes(), logprobs=logprobs.tobytes(), k=k, length=len(rows))


def sample_response(result: dict[str, Any]) -> bytes:
    """Sample task result → SampleResponse bytes (tokens int32, logprobs float32, NaN where no value)."""
    out = pb.SampleResponse()
    for seq in result["sequences"]:
        reason = pb.STOP_REASON_LENGTH if seq.get("stop_reason") == "length" else pb.STOP_REASON_STOP
        out.sequences.add(
            stop_reason=reason,
            tokens=decode_array(seq["tokens"]).astype("<i4").tobytes(),
            logprobs=decode_array(seq["logprobs"]).astype("<f4").tobytes(),
        )
    if result.get("prompt_logprobs"):
        out.prompt_logprobs = decode_array(result["prompt_logprobs"]).astype("<f4").tobytes()
    if result.get("topk_prompt_logprobs") is not None:
        out.topk_prompt_logprobs.CopyFrom(_topk(result["topk_prompt_logprobs"]))
    return out.SerializeToString()
