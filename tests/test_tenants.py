"""Per-key tenancy through the Tinker SDK: a second key sees none of the first key's sessions, models, checkpoints,
samplers or futures (404, never "forbidden"), and an unknown key is refused."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys

import pytest
import redis
import requests
import tinker
from tinker import types

from core.settings import Settings
from tasks.celery_app import make_app
from tests.stackutil import ROOT, TINY_MODEL, RedisServer, Stack, free_port, wait_for

os.environ["TINKER_TELEMETRY"] = "0"


@pytest.fixture(scope="module")
def tenants(make_stack):
    stack = make_stack(1, {"TINKERBELL_AUTH": "on", "TINKERBELL_DOWNLOAD_LINK_TTL_S": "5"})
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


# ---- API keys, download links and the Redis password --------------------------------------------------------


def test_api_keys_are_stored_only_as_their_hash_and_a_near_miss_is_refused(tenants):
    stack, alice_key = tenants["stack"], tenants["alice_key"]
    client = stack.registry().redis
    digest = hashlib.sha256(alice_key.encode()).hexdigest()
    assert client.exists(f"tb:key:{digest}")
    raw = redis.Redis.from_url(stack.env["TINKERBELL_BROKER_URL"])  # every key and value, as bytes
    dump = [raw.dump(name) or b"" for name in raw.scan_iter(count=1000)]
    assert dump and not any(alice_key[4:].encode() in value for value in dump)
    assert client.hget("tb:keys", digest[:16]) == digest
    near_miss = alice_key[:-1] + ("A" if alice_key[-1] != "A" else "B")
    for key in (near_miss, alice_key[:-8], alice_key + "x"):
        response = requests.get(stack.url + "/api/v1/training_runs", headers={"X-API-Key": key}, timeout=10)
        assert response.status_code == 401, key
    assert requests.get(stack.url + "/api/v1/training_runs", headers={"X-API-Key": alice_key}, timeout=10).ok


def test_download_links_are_bound_to_one_file_and_expire(tenants):
    training = tenants["training"]
    path = training.save_weights_external("links").result(timeout=60).path
    urls = tenants["alice"].create_rest_client().get_external_weights_urls(path).result(timeout=30).urls
    weights, config = urls["adapter_model.safetensors"], urls["adapter_config.json"]
    assert requests.get(config, timeout=10).json()["r"] == 4  # no API key needed: the signature is the credential
    # one file's signature does not open another file, nor the same file of another checkpoint
    swapped = config.split("?")[0] + "?" + weights.split("?")[1]
    other = config.replace("/external_weights/links/", "/weights/alice-state/")
    for url in (swapped, other, config.replace("expires=", "expires=1")):
        response = requests.get(url, timeout=10)
        assert response.status_code == 403 and "invalid or has expired" in response.json()["error"], url
    # TINKERBELL_DOWNLOAD_LINK_TTL_S is 5 s on this stack
    wait_for(lambda: requests.get(weights, timeout=10).status_code == 403, 15, "the link to expire")


REDIS_PASSWORD = "tb-Locked_7"


@pytest.fixture(scope="module")
def locked_redis():
    """A Redis that speaks only TLS (self-signed certificate) and requires a password."""
    server = RedisServer(password=REDIS_PASSWORD, tls=True)
    yield server
    server.stop()


def test_every_component_runs_on_a_redis_with_tls_and_a_password(locked_redis, models_dir, tmp_path_factory):
    url = locked_redis.url(1, password=False)  # TINKERBELL_REDIS_PASSWORD puts the password in
    assert url.startswith("rediss://")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(url).ping()
    with pytest.raises(redis.ConnectionError):  # no TLS: the server hangs up
        redis.Redis(port=locked_redis.port, password=REDIS_PASSWORD, socket_timeout=5).ping()
    env = {"TINKERBELL_BROKER_URL": url, "TINKERBELL_REDIS_PASSWORD": REDIS_PASSWORD, "TINKERBELL_AUTH": "on"}
    stack = Stack(locked_redis, 1, models_dir, tmp_path_factory.mktemp("locked"), extra_env=env)
    flower = None
    try:
        stack.start_worker("w0")
        stack.start_api()
        created = subprocess.run(
            [sys.executable, "-m", "api.keys", "create", "--name", "locked"],
            cwd=ROOT,
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        key = created.stdout.strip()
        assert key.startswith("tml-"), created.stderr
        service = tinker.ServiceClient(base_url=stack.url, api_key=key)
        training = service.create_lora_training_client(TINY_MODEL, rank=4).result(timeout=120)
        datum = tinker.Datum(
            model_input=tinker.ModelInput.from_ints([1, 2, 3]),
            loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0] * 3},
        )
        assert "loss:sum" in training.forward_backward([datum], "cross_entropy").result(timeout=60).metrics
        training.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=60)
        sampler = training.save_weights_and_get_sampling_client().result(timeout=60)
        sample = sampler.sample(
            tinker.ModelInput.from_ints([1, 2]), num_samples=1, sampling_params=types.SamplingParams(max_tokens=2)
        ).result(timeout=60)
        assert len(sample.sequences[0].tokens) == 2
        # celery inspect, as an operator runs it, and Flower behind its login
        control = make_app(Settings.from_env(stack.env))
        node = f"w0@{socket.gethostname()}"
        assert node in (control.control.inspect(timeout=5).ping() or {})
        control.close()
        port = free_port()
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "flower", f"--port={port}", "--address=127.0.0.1"],
            cwd=ROOT,
            env={**stack.env, "FLOWER_BASIC_AUTH": "ops:secret"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def flower_lists_worker() -> bool:
            try:
                answer = requests.get(
                    f"http://127.0.0.1:{port}/api/workers",
                    params={"refresh": "true"},
                    auth=("ops", "secret"),
                    timeout=5,
                )
                return answer.status_code == 200 and node in answer.json()
            except requests.RequestException:
                return False

        wait_for(lambda: flower_lists_worker() or flower.poll() is not None, 60, "flower")
        assert flower.poll() is None and flower_lists_worker()
        assert requests.get(f"http://127.0.0.1:{port}/api/workers", timeout=5).status_code == 401
    finally:
        if flower is not None:
            os.killpg(flower.pid, signal.SIGTERM)
            flower.wait(15)
        stack.stop()
