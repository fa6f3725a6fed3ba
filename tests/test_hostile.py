"""Hostile input against the real stack (gunicorn API, Redis, a worker), as raw HTTP: every case is refused with a 4xx
that names the limit or field, before a worker sees it. The stack runs with small TINKERBELL_MAX_* limits so each
limit is crossed with a small request."""

from __future__ import annotations

import copy
import http.client
import json
import random
import time
from urllib.parse import urlparse

import numpy as np
import pytest
import requests
import zstandard

from api import proto
from client import TinkerbellClient
from tests.stackutil import TINY_MODEL

LIMITS = {
    "TINKERBELL_MAX_BODY_BYTES": 200_000,
    "TINKERBELL_MAX_DATUM_TOKENS": 64,
    "TINKERBELL_MAX_REQUEST_DATUMS": 4,
    "TINKERBELL_MAX_REQUEST_TOKENS": 128,
    "TINKERBELL_MAX_NUM_SAMPLES": 4,
    "TINKERBELL_MAX_SAMPLE_TOKENS": 16,
    "TINKERBELL_MAX_PROMPT_TOKENS": 32,
}
HEADERS = {"X-API-Key": "tml-hostile"}
PROTO_HEADERS = {**HEADERS, "Content-Type": proto.PROTO_CONTENT_TYPE, "Content-Encoding": "zstd"}


@pytest.fixture(scope="module")
def hostile(make_stack):
    env = {name: str(value) for name, value in LIMITS.items()}
    stack = make_stack(1, {"TINKERBELL_AUTH": "off", "TINKERBELL_SEQ_GAP_TIMEOUT_S": "1", **env})
    return stack


@pytest.fixture(scope="module")
def model_id(hostile) -> str:
    return TinkerbellClient(hostile.url, api_key=HEADERS["X-API-Key"]).add_lora(rank=4, seed=0).result(120)["model_id"]


def post(stack, path: str, payload) -> requests.Response:
    """JSON as Python writes it: NaN and Infinity included (requests' json= refuses them; a hostile client need not)."""
    headers = {**HEADERS, "Content-Type": "application/json"}
    return requests.post(stack.url + path, data=json.dumps(payload), headers=headers, timeout=30)


def refused(response: requests.Response, *names: str, status: int = 400) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    answer = response.json()
    assert answer["category"] == "user"
    for name in names:
        assert name in answer["error"], answer["error"]


def datum(length: int, weight: float = 1.0) -> dict:
    tokens = list(range(1, length + 1))
    return {"model_input": tokens, "loss_fn_inputs": {"target_tokens": tokens, "weights": [weight] * length}}


def fwdbwd(model_id: str, data: list[dict], **extra) -> dict:
    return {"model_id": model_id, "forward_backward_input": {"data": data, "loss_fn": "cross_entropy"}, **extra}


def proto_body(model_id: str, seq_id: int, lengths: list[int]) -> bytes:
    msg = proto.pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy")
    for length in lengths:
        tokens = np.arange(1, length + 1)
        item = msg.data.add()
        item.model_input.add().encoded_text.tokens = tokens.astype("<i4").tobytes()
        for name, values, dtype in (("target_tokens", tokens, proto.pb.DTYPE_INT64), ("weights", np.ones(length), 0)):
            tensor = item.loss_fn_inputs[name]
            tensor.dtype = dtype or proto.pb.DTYPE_FLOAT32
            tensor.shape.append(length)
            tensor.dense = values.astype("<i8" if dtype else "<f4").tobytes()
    return msg.SerializeToString()


# ---- sizes ---------------------------------------------------------------------------------------
def test_body_over_the_limit_is_refused_before_it_is_read(hostile):
    url = urlparse(hostile.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    connection.putrequest("POST", "/api/v1/forward_backward")
    for name, value in {**HEADERS, "Content-Type": "application/json", "Content-Length": str(10**12)}.items():
        connection.putheader(name, value)
    connection.endheaders()  # and never the body: the answer must not wait for it
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    assert response.status == 413 and answer["category"] == "user"
    assert "TINKERBELL_MAX_BODY_BYTES=200000" in answer["error"]


def test_chunked_body_past_the_limit_is_refused(hostile):
    chunks = (b" " * 50_000 for _ in range(8))  # no Content-Length: werkzeug stops reading at the limit
    response = requests.post(
        hostile.url + "/api/v1/create_session",
        data=chunks,
        headers={**HEADERS, "Content-Type": "application/json"},
        timeout=30,
    )
    refused(response, "TINKERBELL_MAX_BODY_BYTES", status=413)


def test_zstd_bomb_is_refused_at_the_limit(hostile, model_id):
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * 50_000_000)
    assert len(bomb) < 10_000
    response = requests.post(hostile.url + "/api/v1/forward_backward", data=bomb, headers=PROTO_HEADERS, timeout=30)
    refused(response, "after zstd decompression", "TINKERBELL_MAX_BODY_BYTES=200000", status=413)


@pytest.mark.parametrize("face", ["json", "native", "proto"])
@pytest.mark.parametrize(
    ("lengths", "limit"),
    [
        ([4] * 5, "TINKERBELL_MAX_REQUEST_DATUMS=4"),
        ([65], "TINKERBELL_MAX_DATUM_TOKENS=64"),
        ([60, 60, 60], "TINKERBELL_MAX_REQUEST_TOKENS=128"),
    ],
)
def test_forward_backward_over_a_limit_is_refused_on_every_face(hostile, model_id, face, lengths, limit):
    if face == "json":
        response = post(hostile, "/api/v1/forward_backward", fwdbwd(model_id, [datum(n) for n in lengths]))
    elif face == "native":
        response = post(hostile, "/fwdbwd", {"model_id": model_id, "data": [datum(n) for n in lengths]})
    else:
        # seq_id far ahead: a refusal uses it up without holding this module's other requests
        body = zstandard.ZstdCompressor().compress(proto_body(model_id, 1_000_000 + len(lengths), lengths))
        response = requests.post(hostile.url + "/api/v1/forward_backward", data=body, headers=PROTO_HEADERS, timeout=30)
    refused(response, limit)


@pytest.mark.parametrize(
    ("change", "limit"),
    [
        ({"prompt": list(range(1, 34))}, "TINKERBELL_MAX_PROMPT_TOKENS=32"),
        ({"num_samples": 5}, "TINKERBELL_MAX_NUM_SAMPLES=4"),
        ({"sampling_params": {"max_tokens": 17}}, "TINKERBELL_MAX_SAMPLE_TOKENS=16"),
    ],
)
def test_sample_over_a_limit_is_refused(hostile, change, limit):
    payload = {"base_model": TINY_MODEL, "prompt": [1, 2, 3], "num_samples": 1, "sampling_params": {"max_tokens": 4}}
    refused(post(hostile, "/api/v1/asample", {**payload, **change}), limit)


def test_requests_at_the_limits_are_accepted(hostile, model_id):
    answer = post(hostile, "/api/v1/forward_backward", fwdbwd(model_id, [datum(64), datum(64)]))
    assert answer.status_code == 200, answer.text
    sample = {
        "base_model": TINY_MODEL,
        "prompt": list(range(1, 33)),
        "num_samples": 4,
        "sampling_params": {"max_tokens": 16},
    }
    answer = post(hostile, "/api/v1/asample", sample)
    assert answer.status_code == 200, answer.text


def test_a_tiny_sparse_tensor_cannot_expand_past_the_body_limit(hostile, model_id):
    sparse = {"data": [1.0], "dtype": "float32", "shape": [2, 10**7], "sparse_crow_indices": [0, 1, 1]}
    sparse["sparse_col_indices"] = [0]
    item = {**datum(2), "loss_fn_inputs": {**datum(2)["loss_fn_inputs"], "teacher": sparse}}
    refused(post(hostile, "/api/v1/forward_backward", fwdbwd(model_id, [item])), "TINKERBELL_MAX_BODY_BYTES=200000")


# ---- names, numbers, seq_ids ---------------------------------------------------------------------
@pytest.mark.parametrize("name", [".", "..", "...", "a/b", "../x", "a\x00b", "x" * 256, ""])
def test_checkpoint_names_that_are_not_names_are_refused(hostile, model_id, name):
    refused(post(hostile, "/save_state", {"model_id": model_id, "name": name}), "checkpoint name")
    refused(post(hostile, "/api/v1/save_weights", {"model_id": model_id, "path": name}), "checkpoint name")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_loss_inputs_are_refused(hostile, model_id, value):
    refused(post(hostile, "/api/v1/forward_backward", fwdbwd(model_id, [datum(4, value)])), "weights", "NaN or inf")
    advantages = {**datum(4), "loss_fn_inputs": {**datum(4)["loss_fn_inputs"], "advantages": [value] * 4}}
    refused(post(hostile, "/fwdbwd", {"model_id": model_id, "data": [advantages]}), "advantages", "NaN or inf")


@pytest.mark.parametrize(
    ("adam", "field"),
    [
        ({"learning_rate": float("inf")}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"beta1": float("nan")}, "beta1"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-8}, "eps"),
        ({"eps": float("inf")}, "eps"),
        ({"weight_decay": float("inf")}, "weight_decay"),
    ],
)
def test_adam_params_that_make_a_step_undefined_are_refused(hostile, model_id, adam, field):
    refused(post(hostile, "/api/v1/optim_step", {"model_id": model_id, "adam_params": adam}), f"adam_params.{field}")
    refused(post(hostile, "/optim_step", {"model_id": model_id, "adam_params": adam}), f"adam_params.{field}")


@pytest.mark.parametrize("seq_id", [True, False, 1e30, 1.0, -1, 0, 2**31, 2**64, "3"])
def test_seq_id_outside_int32_is_refused(hostile, model_id, seq_id):
    refused(post(hostile, "/api/v1/optim_step", {"model_id": model_id, "seq_id": seq_id}), "seq_id", "2147483647")
    refused(post(hostile, "/fwdbwd", {"model_id": model_id, "seq_id": seq_id, "data": [datum(4)]}), "seq_id")


def test_a_gap_up_to_the_largest_seq_id_is_released_at_once(hostile):
    """A request at seq_id 2**31-1 waits the gap timeout (1 s here) for the two billion before it, then runs; the
    release writes nothing per missing id, and one of them arriving later is refused as expired."""
    tb = TinkerbellClient(hostile.url, api_key=HEADERS["X-API-Key"])
    gap_model = tb.add_lora(rank=4, seed=1).result(120)["model_id"]
    answer = post(hostile, "/api/v1/forward_backward", fwdbwd(gap_model, [datum(4)], seq_id=2**31 - 1))
    assert answer.status_code == 200, answer.text
    request_id = answer.json()["request_id"]
    time.sleep(1.5)  # past the gap timeout; the next poll releases the gap
    for _ in range(20):
        result = post(hostile, "/api/v1/retrieve_future", {"request_id": request_id}).json()
        if result.get("type") != "try_again":
            break
    assert "loss:sum" in result["metrics"], result
    registry = hostile.registry()
    assert registry.redis.hlen(f"tb:seq:{gap_model}:ids") == 1
    refused(post(hostile, "/api/v1/forward_backward", fwdbwd(gap_model, [datum(4)], seq_id=5)), "seq_id 5")


# ---- checkpoint TTL --------------------------------------------------------------------------------
def test_malformed_ttl_body_is_refused_and_keeps_the_ttl(hostile, model_id):
    tb = TinkerbellClient(hostile.url, api_key=HEADERS["X-API-Key"])
    tb.save_state(model_id, "ttl-kept").result(60)
    url = f"{hostile.url}/api/v1/training_runs/{model_id}/checkpoints/weights/ttl-kept/ttl"
    set_ttl = requests.put(url, json={"ttl_seconds": 3600}, headers=HEADERS, timeout=10)
    assert set_ttl.status_code == 200 and set_ttl.json()["expires_at"], set_ttl.text
    for data in (b"{not json", b"[]", b"{}", b'"ttl"', b'{"ttl_seconds": "soon"}', b'{"ttl_seconds": -5}'):
        response = requests.put(url, data=data, headers={**HEADERS, "Content-Type": "application/json"}, timeout=10)
        refused(response, "body" if data != b'{"ttl_seconds": "soon"}' and data != b'{"ttl_seconds": -5}' else "ttl")
    listing = requests.get(f"{hostile.url}/api/v1/training_runs/{model_id}/checkpoints", headers=HEADERS, timeout=10)
    [record] = [c for c in listing.json()["checkpoints"] if c["checkpoint_id"] == "weights/ttl-kept"]
    assert record["expires_at"] == set_ttl.json()["expires_at"]


# ---- protobuf bodies ----------------------------------------------------------------------------------
def test_random_and_truncated_protobuf_bodies_get_a_4xx(hostile):
    rng = random.Random(15)
    session = requests.Session()
    url = hostile.url + "/api/v1/forward_backward"
    plain = {**HEADERS, "Content-Type": proto.PROTO_CONTENT_TYPE}
    statuses = []
    for _ in range(150):
        body = rng.randbytes(rng.randrange(1, 400))
        statuses.append(session.post(url, data=body, headers=plain, timeout=30).status_code)
        statuses.append(session.post(url, data=body, headers=PROTO_HEADERS, timeout=30).status_code)  # not zstd
    # every prefix of a real request (for a model nobody has: a prefix that parses is still refused, never run)
    whole = proto_body("nobody:train:0", 1, [5, 3])
    for end in range(len(whole)):
        statuses.append(session.post(url, data=whole[:end], headers=plain, timeout=30).status_code)
        compressed = zstandard.ZstdCompressor().compress(whole)[: max(1, end % 60)]
        statuses.append(session.post(url, data=compressed, headers=PROTO_HEADERS, timeout=30).status_code)
    assert all(400 <= status < 500 for status in statuses), sorted(set(statuses))
    assert session.get(hostile.url + "/healthz", timeout=10).json()["workers"]


def test_client_config_makes_the_sdk_chunk_inside_the_limits(hostile):
    config = post(hostile, "/api/v1/client/config", {}).json()
    assert config["fwdbwd_max_chunk_len"] == LIMITS["TINKERBELL_MAX_REQUEST_DATUMS"]
    assert config["fwdbwd_max_chunk_bytes_count"] <= LIMITS["TINKERBELL_MAX_BODY_BYTES"] // 2


# ---- wrong types anywhere ---------------------------------------------------------------------------
WRONG = [None, True, -1, 2**70, 1.5, 1e308, float("nan"), "x", "", [], [1], {}, {"a": 1}, [[[]]]]


def _field_paths(value, prefix=()):
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        yield from _field_paths(inner, (*prefix, key))


def _replaced(value, path, new):
    if not path:
        return new
    value = copy.deepcopy(value)
    inner = value
    for key in path[:-1]:
        inner = inner[key]
    inner[path[-1]] = new
    return value


def test_any_field_of_the_wrong_type_is_a_4xx_never_a_5xx(hostile, model_id):
    tensor = {"data": [1, 2], "dtype": "int64", "shape": [2]}
    tokens = {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}
    routes = {
        "/api/v1/forward_backward": fwdbwd(
            model_id, [{"model_input": tokens, "loss_fn_inputs": {"target_tokens": tensor, "weights": [1.0, 1.0]}}]
        ),
        "/api/v1/optim_step": {"model_id": model_id, "adam_params": {"learning_rate": 1e-3, "eps": 1e-8}},
        "/api/v1/asample": {
            "base_model": TINY_MODEL,
            "prompt": tokens,
            "num_samples": 1,
            "sampling_params": {"max_tokens": 2, "stop": ["x"], "temperature": 1.0},
            "topk_prompt_logprobs": 0,
        },
        "/api/v1/save_weights": {"model_id": model_id, "path": "fuzzed", "ttl_seconds": 60},
        "/fwdbwd": {"model_id": model_id, "data": [{"model_input": [1, 2], "loss_fn_inputs": {"weights": [1, 1]}}]},
    }
    session = requests.Session()
    server_errors = []
    for route, payload in routes.items():
        for path in list(_field_paths(payload)):
            for value in WRONG:
                body = json.dumps(_replaced(payload, path, value))
                answer = session.post(
                    hostile.url + route, data=body, headers={**HEADERS, "Content-Type": "application/json"}, timeout=30
                )
                if answer.status_code >= 500:
                    server_errors.append((route, path, value, answer.text[:120]))
    assert not server_errors, server_errors[:10]
