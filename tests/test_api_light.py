"""The API stays light and answers bad input with a 4xx naming the field, on both faces, over real HTTP."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import requests

from tests.stackutil import ROOT, TINY_MODEL

HEADERS = {"X-API-Key": "tml-test"}
CREATE_APP = """
import json, sys, time
started = time.perf_counter()
from api import create_app
from core.settings import Settings
create_app(Settings.from_env({"TINKERBELL_BROKER_URL": "redis://127.0.0.1:9/0"}))
heavy = sorted(m for m in ("torch", "transformers", "peft", "tinker") if m in sys.modules)
print(json.dumps({"seconds": time.perf_counter() - started, "heavy": heavy}))
"""


def test_create_app_imports_neither_torch_nor_the_sdk_package():
    """DESIGN rule 1. create_app() connects to nothing, so a Redis that is not there is fine."""
    run = subprocess.run(
        [sys.executable, "-c", CREATE_APP], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"create_app() from a fresh interpreter: {report['seconds']:.2f} s")  # measured, not asserted (bench/ times)
    assert report["heavy"] == []


def test_the_proto_module_is_the_sdks_own_schema():
    from tinker.proto import tinker_public_pb2 as sdk

    from api import proto

    assert proto.pb.DESCRIPTOR.serialized_pb == sdk.DESCRIPTOR.serialized_pb


# ---- top-k prompt logprobs: the nested list of today's workers and the bytes form both decode the same ----------
TOPK_ROWS = [[], [(5, -0.5), (7, -1.5)], [(9, -0.25), (3, -2.0)]]


@pytest.mark.parametrize("form", ["nested list", "bytes"])
def test_topk_prompt_logprobs_decode_from_both_wire_forms(form):
    from api import proto
    from api.jsonwire import topk_json
    from core.wire import encode_topk

    payload = [[[t, lp] for t, lp in row] for row in TOPK_ROWS] if form == "nested list" else encode_topk(TOPK_ROWS)
    assert topk_json(payload) == [[[t, lp] for t, lp in row] for row in TOPK_ROWS]
    message = proto.pb.TopkLogprobs()
    message.ParseFromString(proto._topk(payload).SerializeToString())
    assert (message.k, message.length) == (2, 3)
    ids = np.frombuffer(message.token_ids, dtype="<i4").reshape(3, 2)
    logprobs = np.frombuffer(message.logprobs, dtype="<f4").reshape(3, 2)
    assert ids.tolist() == [[0, 0], [5, 7], [9, 3]]
    assert logprobs.tolist() == [[-99999.0, -99999.0], [-0.5, -1.5], [-0.25, -2.0]]


# ---- bad input over HTTP ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def light(make_stack):
    """The API and Redis without a worker: every case here is refused before anything would run."""
    return make_stack(0, {"TINKERBELL_AUTH": "off"})


@pytest.fixture(scope="module")
def model_id(light) -> str:
    """A model in the registry (owned by the auth-off owner) that no worker serves: admitted requests just wait."""
    from core.registry import LOCAL_OWNER

    registry = light.registry()
    session_id = registry.create_session(LOCAL_OWNER)
    model_id = f"{session_id}:train:0"
    assert registry.create_model(model_id, LOCAL_OWNER, session_id, TINY_MODEL, {"rank": 4}, "nobody")
    return model_id


def datum(**inputs) -> dict:
    return {
        "model_input": [1, 2, 3],
        "loss_fn_inputs": {"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0], **inputs},
    }


def csr(**fields) -> dict:
    """A 3x4 float TensorData in CSR form, one value per row, with fields overridden."""
    tensor = {
        "data": [1.0, 1.0, 1.0],
        "dtype": "float32",
        "shape": [3, 4],
        "sparse_crow_indices": [0, 1, 2, 3],
        "sparse_col_indices": [0, 1, 2],
    }
    return {**tensor, **fields}


BAD_JSON = [
    # (case, route, payload (model_id added), the field the error must name)
    ("seq_id true", "/fwdbwd", {"seq_id": True, "data": [datum()]}, "seq_id"),
    ("seq_id 1e30", "/fwdbwd", {"seq_id": 1e30, "data": [datum()]}, "seq_id"),
    ("seq_id huge int", "/optim_step", {"seq_id": 10**30}, "seq_id"),
    ("seq_id string", "/optim_step", {"seq_id": "3"}, "seq_id"),
    ("seq_id zero", "/save_state", {"seq_id": 0}, "seq_id"),
    ("data an object", "/fwdbwd", {"data": {"model_input": [1]}}, "data"),
    (
        "loss_fn_inputs a list",
        "/fwdbwd",
        {"data": [{"model_input": [1, 2], "loss_fn_inputs": [1, 2]}]},
        "loss_fn_inputs",
    ),
    ("token id past int64", "/fwdbwd", {"data": [{"model_input": [1, 10**30, 3]}]}, "model_input"),
    ("target past int64", "/fwdbwd", {"data": [datum(target_tokens=[2, 10**30, 4])]}, "target_tokens"),
    ("chunks not a list", "/fwdbwd", {"data": [{"model_input": {"chunks": 5}}]}, "chunks"),
    ("chunk not an object", "/fwdbwd", {"data": [{"model_input": {"chunks": [5]}}]}, "chunks[0]"),
    ("csr shape huge", "/fwdbwd", {"data": [datum(dist=csr(shape=[3, 10**12]))]}, "shape"),
    ("csr shape negative", "/fwdbwd", {"data": [datum(dist=csr(shape=[3, -4]))]}, "shape"),
    ("csr rows past the end", "/fwdbwd", {"data": [datum(dist=csr(sparse_crow_indices=[0, 1, 2, 9]))]}, "crow_indices"),
    ("csr column out of range", "/fwdbwd", {"data": [datum(dist=csr(sparse_col_indices=[0, 1, 7]))]}, "col_indices"),
    (
        "dense shape a string",
        "/fwdbwd",
        {"data": [datum(weights={"data": [1, 1, 1], "dtype": "float32", "shape": "3"})]},
        "shape",
    ),
    ("loss_fn_config a list", "/fwdbwd", {"data": [datum()], "loss_fn_config": [1]}, "loss_fn_config"),
    (
        "loss_fn_config past int64",
        "/fwdbwd",
        {"data": [datum()], "loss_fn_config": {"beta": 10**30}},
        "loss_fn_config.beta",
    ),
    ("forward_only a string", "/fwdbwd", {"data": [datum()], "forward_only": "yes"}, "forward_only"),
    ("adam_params a list", "/optim_step", {"adam_params": [1e-3]}, "adam_params"),
    ("learning rate a string", "/optim_step", {"adam_params": {"learning_rate": "fast"}}, "learning_rate"),
    ("beta1 a boolean", "/optim_step", {"adam_params": {"beta1": True}}, "beta1"),
    ("ttl past a century", "/save_state", {"ttl_seconds": 10**30}, "ttl_seconds"),
    ("ttl a boolean", "/save_state", {"ttl_seconds": True}, "ttl_seconds"),
    ("checkpoint name a list", "/save_state", {"name": ["a"]}, "path"),
    ("load path a number", "/load_state", {"path": 5}, "path"),
    ("lora_config a list", "/add_lora", {"lora_config": [4]}, "lora_config"),
    ("rank a string", "/add_lora", {"rank": "8"}, "rank"),
    ("alpha a string", "/add_lora", {"alpha": "x"}, "alpha"),
    ("train_mlp a string", "/add_lora", {"train_mlp": "no"}, "train_mlp"),
    ("user_metadata a list", "/add_lora", {"user_metadata": [1]}, "user_metadata"),
    ("session_id a number", "/add_lora", {"session_id": 5}, "session_id"),
    ("max_tokens a string", "/asample", {"sampling_params": {"max_tokens": "abc"}}, "max_tokens"),
    ("max_tokens past int32", "/asample", {"sampling_params": {"max_tokens": 10**30}}, "max_tokens"),
    ("temperature a string", "/asample", {"sampling_params": {"temperature": "hot"}}, "temperature"),
    ("top_p a list", "/asample", {"sampling_params": {"top_p": [1]}}, "top_p"),
    ("top_k a fraction", "/asample", {"sampling_params": {"top_k": 1.5}}, "top_k"),
    ("seed negative", "/asample", {"sampling_params": {"seed": -1}}, "seed"),
    ("stop mixed", "/asample", {"sampling_params": {"stop": [1, "a"]}}, "stop"),
    ("sampling_params a list", "/asample", {"sampling_params": [1]}, "sampling_params"),
    ("topk a string", "/asample", {"topk_prompt_logprobs": "abc"}, "topk_prompt_logprobs"),
    ("topk 1e30", "/asample", {"topk_prompt_logprobs": 1e30}, "topk_prompt_logprobs"),
    ("num_samples true", "/asample", {"num_samples": True}, "num_samples"),
    ("prompt_logprobs a string", "/asample", {"prompt_logprobs": "yes"}, "prompt_logprobs"),
    ("negative prompt token", "/asample", {"prompt": [1, -2]}, "prompt"),
    ("no prompt", "/asample", {"prompt": None}, "prompt"),
    ("sampling_session_id a list", "/asample", {"sampling_session_id": ["x"]}, "sampling_session_id"),
    ("topk_sample_logprobs negative", "/asample", {"topk_sample_logprobs": -1}, "topk_sample_logprobs"),
    ("topk_sample_logprobs past the limit", "/asample", {"topk_sample_logprobs": 5000}, "topk_sample_logprobs"),
    ("prompt_alt_tokens_k a string", "/asample", {"prompt_alt_tokens_k": "4"}, "prompt_alt_tokens_k"),
    ("prompt_alt_tokens_k past the limit", "/asample", {"prompt_alt_tokens_k": 10**6}, "prompt_alt_tokens_k"),
    ("record_stability_info a string", "/asample", {"record_stability_info": "yes"}, "record_stability_info"),
    (
        "target rows not len(prompt) - 1",
        "/asample",
        {"target_prompt_logprobs": {"data": [5, 6, 7], "dtype": "int64", "shape": [3, 1]}},
        "target_prompt_logprobs.shape: needs exactly len(prompt) - 1 = 2 rows",
    ),
    (
        "target 1-D",
        "/asample",
        {"target_prompt_logprobs": {"data": [5, 6], "dtype": "int64", "shape": [2]}},
        "target_prompt_logprobs.shape",
    ),
    (
        "target float ids",
        "/asample",
        {"target_prompt_logprobs": {"data": [5.0, 6.0], "dtype": "float32", "shape": [2, 1]}},
        "target_prompt_logprobs.dtype",
    ),
    ("target every cell -1", "/asample", {"target_prompt_logprobs": [[-1], [-1]]}, "names no token id"),
    ("target id below -1", "/asample", {"target_prompt_logprobs": [[-2], [5]]}, "target_prompt_logprobs: token id -2"),
    (
        "target too many distinct ids",
        "/asample",
        {"target_prompt_logprobs": [list(range(1025)), list(range(1025))]},
        "1025 distinct token ids; at most 1024",
    ),
    (
        "target csr column out of range",
        "/asample",
        {
            "target_prompt_logprobs": {
                "data": [5, 6],
                "dtype": "int64",
                "shape": [2, 4],
                "sparse_crow_indices": [0, 1, 2],
                "sparse_col_indices": [0, 9],
            }
        },
        "target_prompt_logprobs.col_indices",
    ),
    ("timeout a string", "/retrieve_future", {"request_id": "r", "timeout": "abc"}, "timeout"),
    ("timeout a list", "/retrieve_future", {"request_id": "r", "timeout": [1]}, "timeout"),
    ("timeout negative", "/retrieve_future", {"request_id": "r", "timeout": -1}, "timeout"),
    ("request_id a number", "/retrieve_future", {"request_id": 5}, "request_id"),
    (
        "tinker seq_id true",
        "/api/v1/forward_backward",
        {"seq_id": True, "forward_backward_input": {"data": [datum()]}},
        "seq_id",
    ),
    (
        "tinker fwdbwd input a list",
        "/api/v1/forward_backward",
        {"seq_id": 1, "forward_backward_input": [1]},
        "forward_backward_input",
    ),
    ("tinker optim seq_id 1e30", "/api/v1/optim_step", {"seq_id": 1e30}, "seq_id"),
    ("tinker model_seq_id true", "/api/v1/create_model", {"session_id": "s", "model_seq_id": True}, "model_seq_id"),
    ("tinker save ttl huge", "/api/v1/save_weights", {"seq_id": 1, "path": "a", "ttl_seconds": 10**30}, "ttl_seconds"),
    (
        "tinker load optimizer a string",
        "/api/v1/load_weights",
        {"path": "tinker://x/weights/a", "optimizer": "yes"},
        "optimizer",
    ),
    (
        "tinker sampler seq a string",
        "/api/v1/create_sampling_session",
        {"session_id": "s", "sampling_session_seq_id": "x"},
        "sampling_session_seq_id",
    ),
    (
        "tinker model_path a number",
        "/api/v1/create_sampling_session",
        {"session_id": "s", "sampling_session_seq_id": 0, "model_path": 5},
        "model_path",
    ),
]


def _asample_defaults(route: str, payload: dict) -> dict:
    return {"base_model": TINY_MODEL, "prompt": [1, 2, 3], **payload} if route == "/asample" else payload


@pytest.mark.parametrize("case,route,payload,field", BAD_JSON, ids=[c[0] for c in BAD_JSON])
def test_bad_json_is_a_4xx_naming_the_field(light, model_id, case, route, payload, field):
    payload = {"model_id": model_id, **_asample_defaults(route, payload)}
    response = requests.post(light.url + route, json=payload, headers=HEADERS, timeout=30)
    assert 400 <= response.status_code < 500, response.text
    assert field in response.json()["error"] and response.json()["category"] == "user"


@pytest.mark.parametrize("query", ["limit=1000000000000000000000000", "offset=-1", "limit=x"])
def test_bad_listing_page_is_a_4xx(light, query):
    response = requests.get(f"{light.url}/api/v1/training_runs?{query}", headers=HEADERS, timeout=30)
    assert response.status_code == 400 and "limit/offset" in response.json()["error"]


def test_deeply_nested_json_is_a_4xx(light):
    response = requests.post(
        light.url + "/fwdbwd",
        data="[" * 100_000 + "]" * 100_000,
        headers={**HEADERS, "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400 and "body" in response.json()["error"]


def _proto_request(model_id: str, tensor_fields: dict, shape: list[int], seq_id: int = 1) -> bytes:
    from api import proto

    pb = proto.pb
    request = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy")
    datum = request.data.add()
    datum.model_input.add().encoded_text.tokens = np.array([1, 2, 3], dtype="<i4").tobytes()
    datum.loss_fn_inputs["target_tokens"].CopyFrom(
        pb.Tensor(dense=np.array([2, 3, 4], dtype="<i8").tobytes(), dtype=pb.DTYPE_INT64, shape=[3])
    )
    datum.loss_fn_inputs["dist"].CopyFrom(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=shape, **tensor_fields))
    return request.SerializeToString()


def _csr(values: list[float], crow: list[int], col: list[int]) -> dict:
    from api import proto

    return {
        "sparse_csr": proto.pb.SparseCsr(
            values=np.array(values, "<f4").tobytes(),
            crow_indices=np.array(crow, "<i8").tobytes(),
            col_indices=np.array(col, "<i8").tobytes(),
        )
    }


BAD_PROTO = [
    ("csr rows past the end", _csr([1, 1, 1], [0, 1, 2, 9], [0, 1, 2]), [3, 4], "crow_indices"),
    ("csr column out of range", _csr([1, 1, 1], [0, 1, 2, 3], [0, 1, 9]), [3, 4], "col_indices"),
    ("csr shape huge", _csr([1, 1, 1], [0, 1, 2, 3], [0, 1, 2]), [3, 10**12], "shape"),
    ("dense shape negative", {"dense": b"\0" * 12}, [-3], "shape"),
    ("dense bytes not whole floats", {"dense": b"\0" * 11}, [3], "bytes"),
    ("dense values short of the shape", {"dense": b"\0" * 8}, [3], "fill shape"),
]


@pytest.mark.parametrize("case,fields,shape,expected", BAD_PROTO, ids=[c[0] for c in BAD_PROTO])
def test_bad_protobuf_tensor_is_a_4xx_naming_the_field(light, model_id, case, fields, shape, expected):
    body = _proto_request(model_id, fields, shape)
    response = requests.post(
        light.url + "/api/v1/forward_backward",
        data=body,
        headers={**HEADERS, "Content-Type": "application/x-protobuf"},
        timeout=30,
    )
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert "loss_fn_inputs.dist" in error and expected in error


def test_protobuf_seq_id_zero_is_a_4xx(light, model_id):
    body = _proto_request(model_id, {"dense": b"\0" * 12}, [3], seq_id=0)
    response = requests.post(
        light.url + "/api/v1/forward_backward",
        data=body,
        headers={**HEADERS, "Content-Type": "application/x-protobuf"},
        timeout=30,
    )
    assert response.status_code == 400 and "seq_id" in response.json()["error"]


def test_a_zstd_body_of_several_frames_is_read_whole():
    import zstandard

    from api.proto import decompress

    whole = bytes(range(256)) * 64
    frames = b"".join(zstandard.ZstdCompressor().compress(part) for part in (whole[:5000], whole[5000:]))
    assert decompress(frames, "zstd", limit=len(whole)) == whole
    with pytest.raises(Exception, match="after zstd decompression"):
        decompress(frames, "zstd", limit=len(whole) - 1)
