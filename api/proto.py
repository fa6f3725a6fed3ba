"""Protobuf on the Tinker face, with the SDK's own `tinker_public_pb2`: ForwardBackwardRequest in, results out.

Requests become core.wire datums (validated like the JSON ones); task results become ForwardBackwardOutput /
SampleResponse bytes. No torch here (DESIGN rule 1).

The generated module is loaded from its file in the installed `tinker` package without running that package's
`__init__` (which imports torch). That file imports only google.protobuf, and loading it this way has no build
step and no second copy of the schema: the wire format is exactly the pinned SDK's (requirements.txt pins
tinker and protobuf). Generating our own from tinker_public.proto would add protoc to the build and a copy
that can drift from the SDK it has to match.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from api.datums import checked_datum, dense, dense_from_csr, target_answer
from api.limits import body_limit, body_too_large
from core.errors import UserError
from core.wire import TOPK_EMPTY, decode_array, decode_topk


def _sdk_proto_module() -> ModuleType:
    """tinker/proto/tinker_public_pb2.py, executed on its own (find_spec of a top-level name imports nothing)."""
    spec = importlib.util.find_spec("tinker")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the tinker SDK is not installed: pip install -r requirements.txt")
    path = Path(spec.submodule_search_locations[0]) / "proto" / "tinker_public_pb2.py"
    module_spec = importlib.util.spec_from_file_location("api._tinker_public_pb2", path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"no generated protobuf module at {path} (has the tinker SDK moved it?)")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


pb: Any = _sdk_proto_module()

PROTO_CONTENT_TYPE = "application/x-protobuf"

_NP_OF = {pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_INT64: np.dtype("<i8"), pb.DTYPE_INT32: np.dtype("<i4")}
_PB_OF = {"float32": pb.DTYPE_FLOAT32, "int64": pb.DTYPE_INT64, "int32": pb.DTYPE_INT32}
VALID_REDUCTIONS = ("mean", "sum", "min", "max", "slack", "hash2", "unique")
_TOPK_EMPTY_LOGPROB = -99999.0


def decompress(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """Undo `Content-Encoding: zstd` (the SDK sends it when client/config says proto_compress_fwdbwd). A body of
    several frames is read whole, as RFC 8878 allows; one that would grow past `limit` bytes
    (TINKERBELL_MAX_BODY_BYTES) is refused after reading limit + 1 of them."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "zstd":
        raise UserError(f"Content-Encoding: {content_encoding!r} is not supported (send zstd or none)")
    import zstandard

    try:
        with zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True) as reader:
            out = reader.read(limit + 1)
    except zstandard.ZstdError as exc:
        raise UserError(f"body: not valid zstd ({exc})") from None
    if len(out) > limit:
        raise body_too_large("request body after zstd decompression", limit)
    return out


def _tensor(msg: pb.Tensor, field: str) -> np.ndarray:
    """A proto Tensor (dense or CSR) as a dense numpy array."""
    dtype = _NP_OF.get(msg.dtype)
    if dtype is None:
        raise UserError(
            f"{field}.dtype: must be float32 or int64, got "
            f"{pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else msg.dtype}"
        )
    shape = [int(s) for s in msg.shape]
    if msg.HasField("sparse_csr"):
        csr = msg.sparse_csr
        values, crow, col = (
            _buffer(data, kind, f"{field}.sparse_csr")
            for data, kind in ((csr.values, dtype), (csr.crow_indices, "<i8"), (csr.col_indices, "<i8"))
        )
        return dense_from_csr(values, crow, col, shape, f"{field}.sparse_csr", body_limit())
    return dense(_buffer(msg.dense, dtype, field), shape or None, field)


def _buffer(data: bytes, dtype: Any, field: str) -> np.ndarray:
    """Little-endian bytes as a native-order flat array."""
    dtype = np.dtype(dtype)
    if len(data) % dtype.itemsize:
        raise UserError(f"{field}: {len(data)} bytes are not whole {dtype.name} values")
    return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="))


def _tokens(datum: pb.Datum, field: str) -> np.ndarray:
    parts = []
    for i, chunk in enumerate(datum.model_input):
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise UserError(
                f"{field}.model_input.chunks[{i}]: only encoded_text chunks are supported, got "
                f"{kind or 'an empty chunk'}"
            )
        parts.append(_buffer(chunk.encoded_text.tokens, "<i4", f"{field}.model_input.chunks[{i}].tokens"))
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
    datums = []
    for i, datum in enumerate(msg.data):
        field = f"data[{i}]"
        tokens = _tokens(datum, field)
        inputs = {
            name: _tensor(tensor, f"{field}.loss_fn_inputs.{name}") for name, tensor in datum.loss_fn_inputs.items()
        }
        datums.append(checked_datum(tokens, inputs, i))
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
        signature = tuple(
            sorted((name, payload["dtype"], tuple(arrays[name].shape[1:])) for name, payload in item.items())
        )
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


def _topk(payload: dict[str, Any] | list) -> Any:
    """Top-k prompt logprobs (core.wire.decode_topk) → TopkLogprobs: N×K arrays, empty cells 0 / -99999."""
    tokens, logprobs = decode_topk(payload)
    empty = tokens == TOPK_EMPTY
    ids = np.where(empty, 0, tokens).astype("<i4")
    logprobs = np.where(empty, _TOPK_EMPTY_LOGPROB, logprobs).astype("<f4")
    k = tokens.shape[1] if tokens.ndim == 2 else 0
    return pb.TopkLogprobs(token_ids=ids.tobytes(), logprobs=logprobs.tobytes(), k=k, length=len(tokens))


def _dense_tensor(array: np.ndarray, dtype: str) -> Any:
    """A numpy array as a dense proto Tensor (dtype float32 or int64)."""
    data = np.ascontiguousarray(array, dtype=_NP_OF[_PB_OF[dtype]]).tobytes()
    return pb.Tensor(dense=data, dtype=_PB_OF[dtype], shape=[int(s) for s in array.shape])


def _target_tensor(payload: dict[str, Any]) -> Any:
    """A result's target_prompt_logprobs (api.datums.target_answer) as a float32 Tensor in the request's layout."""
    values, shape, crow, col = target_answer(payload)
    if crow is None or col is None:
        return _dense_tensor(values.reshape(shape), "float32")
    csr = pb.SparseCsr(
        values=values.astype("<f4").tobytes(),
        crow_indices=crow.astype("<i8").tobytes(),
        col_indices=col.astype("<i8").tobytes(),
    )
    return pb.Tensor(sparse_csr=csr, dtype=pb.DTYPE_FLOAT32, shape=shape)


def sample_response(result: dict[str, Any]) -> bytes:
    """Sample task result → SampleResponse bytes (tokens int32, logprobs float32, NaN where no value)."""
    out = pb.SampleResponse()
    for seq in result["sequences"]:
        reason = pb.STOP_REASON_LENGTH if seq.get("stop_reason") == "length" else pb.STOP_REASON_STOP
        sequence = out.sequences.add(
            stop_reason=reason,
            tokens=decode_array(seq["tokens"]).astype("<i4").tobytes(),
            logprobs=decode_array(seq["logprobs"]).astype("<f4").tobytes(),
        )
        if seq.get("topk_logprobs") is not None:
            sequence.topk_sampled_logprobs.CopyFrom(_topk(seq["topk_logprobs"]))
    if result.get("prompt_logprobs"):
        out.prompt_logprobs = decode_array(result["prompt_logprobs"]).astype("<f4").tobytes()
    if result.get("topk_prompt_logprobs") is not None:
        out.topk_prompt_logprobs.CopyFrom(_topk(result["topk_prompt_logprobs"]))
    if result.get("target_prompt_logprobs"):
        out.target_prompt_logprobs.CopyFrom(_target_tensor(result["target_prompt_logprobs"]))
    if result.get("prompt_alt_tokens"):
        alt = result["prompt_alt_tokens"]
        out.prompt_alt_tokens.tokens.CopyFrom(_dense_tensor(decode_array(alt["tokens"]), "int64"))
        out.prompt_alt_tokens.logprobs.CopyFrom(_dense_tensor(decode_array(alt["logprobs"]), "float32"))
    return out.SerializeToString()
