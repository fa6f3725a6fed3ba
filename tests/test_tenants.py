"""Per-key tenancy through the Tinker SDK: a second key sees none of the first key's sessions, models, checkpoints,
samplers or futures (404, never "forbidden"), and an unknown key is refused."""

from __future__ import annotations

import os

import pytest
import requests
import tinker
from tinker import types

from tests.stackutil import TINY_MODEL

os.environ["TINKER_TELEMETRY"] = "0"


@pytest.fixture(scope="module")
def tenants(make_stack):
    stack = make_stack(1, {"TINKERBELL_AUTH": "on"})
    registry = stack.registry()
    alice_key, bob_key = registry.create_key("alice"), registry.create_key("bob")
    alice = tinker.ServiceClient(base_url=stack.url, api_key=alice_key)
    bob = tinker.ServiceClient(base_url=stack.url, api_key=bob_key)
    training = alice.create_lora_training_client(TINY_MODEL, rank=4, seed=0).result(timeout=120)
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={"target_tokens": [2, 3, 4, 5], "weights": [1.0] * 4},
    )
    training.forward_backward([datum], "cross_entropy").result(timeout=60)
    state = training.save_state("alice-state").result(timeout=60).path
    sampler_path = training.save_weights_for_sampler("alice-sampler").result(timeout=60).path
    alice.create_sampling_client(model_path=sampler_path).get_base_model()
    [sampler_id] = registry.session_children(alice.holder.get_session_id(), "samplers")
    # a future of alice's, from the HTTP API (a second model in her session, so her client's seq_ids stay untouched)
    response = requests.post(
        stack.url + "/api/v1/create_model",
        json={
            "session_id": alice.holder.get_session_id(),
            "model_seq_id": 1,
            "base_model": TINY_MODEL,
            "lora_config": {"rank": 4},
        },
        headers={"X-API-Key": alice_key},
        timeout=10,
    )
    request_id = response.json()["request_id"]
    yield {
        "stack": stack,
        "alice": alice,
        "bob": bob,
        "alice_key": alice_key,
        "bob_key": bob_key,
        "training": training,
        "state": state,
        "sampler_path": sampler_path,
        "sampler_id": sampler_id,
        "request_id": request_id,
        "session_id": alice.holder.get_session_id(),
    }
    for client in (alice, bob):
        client.close("success").result(timeout=30)


def test_second_key_lists_nothing_of_the_first(tenants):
    rest = tenants["bob"].create_rest_client()
    assert rest.list_training_runs(limit=100).result(timeout=30).training_runs == []
    assert rest.list_user_checkpoints(limit=100).result(timeout=30).checkpoints == []
    assert tenants["session_id"] not in rest.list_sessions().result(timeout=30).sessions
    own = tenants["alice"].create_rest_client()
    assert tenants["training"].model_id in [
        r.training_run_id for r in own.list_training_runs(limit=100).result(timeout=30).training_runs
    ]


@pytest.mark.parametrize(
    "what", ["training_run", "checkpoints", "session", "delete_checkpoint", "weights_info", "sampler"]
)
def test_second_key_gets_not_found_for_each_object(tenants, what):
    rest = tenants["bob"].create_rest_client()
    model_id = tenants["training"].model_id
    call = {
        "training_run": lambda: rest.get_training_run(model_id),
        "checkpoints": lambda: rest.list_checkpoints(model_id),
        "session": lambda: rest.get_session(tenants["session_id"]),
        "delete_checkpoint": lambda: rest.delete_checkpoint_from_tinker_path(tenants["state"]),
        "weights_info": lambda: rest.get_weights_info_by_tinker_path(tenants["state"]),
        "sampler": lambda: rest.get_sampler(tenants["sampler_id"]),
    }[what]
    with pytest.raises(tinker.NotFoundError):
        call().result(timeout=30)


def test_second_key_cannot_train_load_sample_or_poll_the_first_keys_objects(tenants):
    stack, bob_key = tenants["stack"], tenants["bob_key"]
    headers = {"X-API-Key": bob_key}
    for path, body in (
        ("/api/v1/get_info", {"model_id": tenants["training"].model_id}),
        (
            "/api/v1/optim_step",
            {"model_id": tenants["training"].model_id, "seq_id": 99, "adam_params": {"learning_rate": 1e-3}},
        ),
        ("/api/v1/retrieve_future", {"request_id": tenants["request_id"]}),
        ("/api/v1/session_heartbeat", {"session_id": tenants["session_id"]}),
        (
            "/api/v1/asample",
            {
                "sampling_session_id": tenants["sampler_id"],
                "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                "num_samples": 1,
                "sampling_params": {"max_tokens": 2},
            },
        ),
    ):
        response = requests.post(stack.url + path, json=body, headers=headers, timeout=30)
        assert response.status_code == 404, (path, response.status_code, response.text)
        assert response.json()["category"] == "user"
    with pytest.raises(tinker.NotFoundError):
        tenants["bob"].create_training_client_from_state(tenants["state"]).result(timeout=60)
    with pytest.raises(tinker.NotFoundError):
        tenants["bob"].create_sampling_client(model_path=tenants["sampler_path"]).sample(
            tinker.ModelInput.from_ints([1, 2]), num_samples=1, sampling_params=types.SamplingParams(max_tokens=2)
        ).result(timeout=60)
    # alice still can
    assert tenants["training"].optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=60) is not None


def test_published_checkpoint_is_loadable_by_another_key(tenants):
    alice_rest = tenants["alice"].create_rest_client()
    alice_rest.publish_checkpoint_from_tinker_path(tenants["state"]).result(timeout=30)
    try:
        info = tenants["bob"].create_rest_client().get_weights_info_by_tinker_path(tenants["state"]).result(timeout=30)
        assert info.base_model == TINY_MODEL
    finally:
        alice_rest.unpublish_checkpoint_from_tinker_path(tenants["state"]).result(timeout=30)


def test_unknown_key_is_refused(tenants):
    response = requests.post(
        tenants["stack"].url + "/api/v1/create_session",
        json={"tags": []},
        headers={"X-API-Key": "tml-not-a-key"},
        timeout=10,
    )
    assert response.status_code == 401 and response.json()["error"]
