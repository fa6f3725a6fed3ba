"""Per-key limits against the real stack, through the official SDK and HTTP: live adapters (403), requests queued or
running (429 + Retry-After, which the SDK retries) and stored checkpoint bytes (403 at submit, or a failed future
when only the written size shows it); each message names the limit and the key's current use, and the counts live
in Redis, so they hold across an API restart and never count another key's objects."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import requests
import tinker
from prometheus_client.parser import text_string_to_metric_families
from tinker import types

from client import TinkerbellClient
from tests.stackutil import TINY_MODEL, Stack, wait_for

os.environ["TINKER_TELEMETRY"] = "0"

MAX_ADAPTERS, MAX_QUEUED, MAX_BYTES = 2, 3, 3_000_000  # a rank-4 tiny adapter is about 0.8 MB
DATUM = {"model_input": [1, 2, 3, 4], "loss_fn_inputs": {"target_tokens": [2, 3, 4, 5], "weights": [1.0] * 4}}
SDK_DATUM = tinker.Datum(
    model_input=tinker.ModelInput.from_ints([1, 2, 3, 4]),
    loss_fn_inputs={"target_tokens": [2, 3, 4, 5], "weights": [1.0] * 4},
)


@pytest.fixture(scope="module")
def quota_stack(make_stack) -> Stack:
    return make_stack(
        1,
        {
            "TINKERBELL_AUTH": "on",
            "TINKERBELL_MAX_ADAPTERS_PER_KEY": str(MAX_ADAPTERS),
            "TINKERBELL_MAX_QUEUED_REQUESTS_PER_KEY": str(MAX_QUEUED),
            "TINKERBELL_MAX_CHECKPOINT_BYTES_PER_KEY": str(MAX_BYTES),
        },
    )


def post(stack: Stack, key: str, path: str, body: dict) -> requests.Response:
    return requests.post(stack.url + path, json=body, headers={"X-API-Key": key}, timeout=30)


def owner_of(stack: Stack, key: str) -> str:
    return stack.registry().lookup_key(key)["key_id"]


def status_count(stack: Stack, status: str) -> float:
    text = requests.get(stack.url + "/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "tinkerbell_http_requests_total" and sample.labels.get("status") == status
    )


def test_adapters_past_the_limit_are_refused_naming_it_until_one_is_removed(quota_stack: Stack) -> None:
    registry = quota_stack.registry()
    key, other = registry.create_key("adapters"), registry.create_key("neighbour")
    service = tinker.ServiceClient(base_url=quota_stack.url, api_key=key)
    service.create_lora_training_client(TINY_MODEL, rank=4).result(timeout=120)
    native = TinkerbellClient(quota_stack.url, api_key=key)
    second = native.add_lora(base_model=TINY_MODEL, rank=4).result(120)["model_id"]
    assert registry.usage(owner_of(quota_stack, key))["adapters"] == MAX_ADAPTERS

    with pytest.raises(tinker.PermissionDeniedError) as refused:
        service.create_lora_training_client(TINY_MODEL, rank=4).result(timeout=60)
    assert "TINKERBELL_MAX_ADAPTERS_PER_KEY" in str(refused.value)
    assert f"holds {MAX_ADAPTERS} live adapters, the limit is {MAX_ADAPTERS}" in str(refused.value)
    raw = post(quota_stack, key, "/add_lora", {"base_model": TINY_MODEL, "rank": 4})
    assert raw.status_code == 403 and raw.json()["category"] == "user", raw.text
    assert raw.headers["x-should-retry"] == "false"  # only the key's owner can free it: the SDK must not retry

    # another key's adapters are its own business
    TinkerbellClient(quota_stack.url, api_key=other).add_lora(base_model=TINY_MODEL, rank=4).result(120)

    # the count is Redis state, not the API process's: a restarted API refuses as well
    quota_stack.procs.pop("api").terminate()
    quota_stack.start_api()
    assert post(quota_stack, key, "/add_lora", {"base_model": TINY_MODEL, "rank": 4}).status_code == 403

    native = TinkerbellClient(quota_stack.url, api_key=key)  # the restarted API listens on a new port
    native.remove_lora(second).result(120)
    assert registry.usage(owner_of(quota_stack, key))["adapters"] == MAX_ADAPTERS - 1
    assert native.add_lora(base_model=TINY_MODEL, rank=4).result(120)["model_id"]


def test_queued_requests_past_the_limit_get_429_and_the_sdk_retries_until_there_is_room(quota_stack: Stack) -> None:
    registry = quota_stack.registry()
    key = registry.create_key("queue")
    owner = owner_of(quota_stack, key)
    native = TinkerbellClient(quota_stack.url, api_key=key)
    model_id = native.add_lora(base_model=TINY_MODEL, rank=4).result(120)["model_id"]
    training = (
        tinker.ServiceClient(base_url=quota_stack.url, api_key=key)
        .create_lora_training_client(TINY_MODEL, rank=4)
        .result(timeout=120)
    )
    wait_for(lambda: registry.usage(owner)["queued_requests"] == 0, 10, "the creates to leave the queued count")

    # seq_ids 3..5 wait for 1 and 2: three requests queued
    held = [post(quota_stack, key, "/fwdbwd", {"model_id": model_id, "seq_id": s, "data": [DATUM]}) for s in (3, 4, 5)]
    assert [r.status_code for r in held] == [200] * 3, [r.text for r in held]
    assert registry.usage(owner)["queued_requests"] == MAX_QUEUED
    refused_before = status_count(quota_stack, "429")
    over = post(quota_stack, key, "/fwdbwd", {"model_id": model_id, "seq_id": 6, "data": [DATUM]})
    assert over.status_code == 429 and over.json()["category"] == "user", over.text
    assert over.headers["Retry-After"] == "1"
    assert "TINKERBELL_MAX_QUEUED_REQUESTS_PER_KEY" in over.json()["error"]
    assert f"has {MAX_QUEUED} requests queued or running, the limit is {MAX_QUEUED}" in over.json()["error"]
    sample = post(
        quota_stack,
        key,
        "/asample",
        {"base_model": TINY_MODEL, "prompt": [1, 2], "sampling_params": {"max_tokens": 2}},
    )
    assert sample.status_code == 429, sample.text

    # the SDK meets the same 429 and retries it (Retry-After) with the same seq_id
    outcome: dict = {}
    thread = threading.Thread(
        target=lambda: outcome.update(result=training.forward_backward([SDK_DATUM], "cross_entropy").result(120))
    )
    thread.start()
    wait_for(lambda: status_count(quota_stack, "429") >= refused_before + 3, 30, "the SDK's request to meet the 429")
    assert thread.is_alive()

    # the missing seq_ids may come in over the limit (the held requests wait for them), and everything runs
    fill = [post(quota_stack, key, "/fwdbwd", {"model_id": model_id, "seq_id": s, "data": [DATUM]}) for s in (1, 2)]
    assert [r.status_code for r in fill] == [200, 200], [r.text for r in fill]
    for response in fill + held:
        assert "loss:sum" in native.retrieve_future(response.json()["request_id"]).result(120)["metrics"]
    thread.join(120)
    assert "loss:sum" in outcome["result"].metrics

    # the refused seq_id 6 was not used up: sent again, it runs
    again = post(quota_stack, key, "/fwdbwd", {"model_id": model_id, "seq_id": 6, "data": [DATUM]})
    assert again.status_code == 200, again.text
    assert native.retrieve_future(again.json()["request_id"]).result(120)["metrics"]
    wait_for(lambda: registry.usage(owner)["queued_requests"] == 0, 10, "finished requests to leave the count")


def test_checkpoint_bytes_past_the_limit_are_refused_and_deleting_frees_them(quota_stack: Stack) -> None:
    registry = quota_stack.registry()
    key = registry.create_key("bytes")
    owner = owner_of(quota_stack, key)
    service = tinker.ServiceClient(base_url=quota_stack.url, api_key=key)
    training = service.create_lora_training_client(TINY_MODEL, rank=4).result(timeout=120)
    training.forward_backward([SDK_DATUM], "cross_entropy").result(timeout=60)
    first = training.save_weights_for_sampler("s0").result(timeout=60).path
    size = registry.checkpoint(training.model_id, "sampler_weights/s0")["size_bytes"]
    assert 0 < size < MAX_BYTES and registry.usage(owner)["checkpoint_bytes"] == size

    # saves fit until the next would pass the limit: only the written size shows it, so that future fails
    saved = 1
    while (saved + 1) * size <= MAX_BYTES:
        training.save_weights_for_sampler(f"s{saved}").result(timeout=60)
        saved += 1
    with pytest.raises(tinker.RequestFailedError) as failed:
        training.save_weights_for_sampler("too-many").result(timeout=60)
    assert "TINKERBELL_MAX_CHECKPOINT_BYTES_PER_KEY" in str(failed.value)
    assert f"stores {saved * size} bytes of checkpoints and this one is {size} bytes" in str(failed.value)
    assert registry.usage(owner)["checkpoint_bytes"] == saved * size <= MAX_BYTES
    assert registry.checkpoint(training.model_id, "sampler_weights/too-many") is None
    assert not (quota_stack.data_dir / "checkpoints" / training.model_id / "sampler_weights" / "too-many").exists()

    # sampler snapshots are counted, not refused (TINKERBELL_EPHEMERAL_KEEP bounds them) ...
    training.save_weights_and_get_sampling_client().result(timeout=60).sample(
        types.ModelInput.from_ints([1, 2]), num_samples=1, sampling_params=types.SamplingParams(max_tokens=2)
    ).result(timeout=60)
    assert registry.usage(owner)["checkpoint_bytes"] > MAX_BYTES
    # ... and once the key is at the limit, a save is refused at submit (403) and training goes on
    with pytest.raises(tinker.PermissionDeniedError) as refused:
        training.save_state("full").result(timeout=60)
    assert f"the limit is {MAX_BYTES}" in str(refused.value)
    assert "loss:sum" in training.forward_backward([SDK_DATUM], "cross_entropy").result(timeout=60).metrics

    rest = service.create_rest_client()
    stored = registry.usage(owner)["checkpoint_bytes"]
    rest.delete_checkpoint_from_tinker_path(first).result(timeout=30)
    assert registry.usage(owner)["checkpoint_bytes"] == stored - size
    for name in (f"s{n}" for n in range(1, saved)):
        rest.delete_checkpoint(training.model_id, f"sampler_weights/{name}").result(timeout=30)
    assert training.save_weights_for_sampler("after-delete").result(timeout=60).path
    # overwriting a checkpoint gives its old size back first
    before = registry.usage(owner)["checkpoint_bytes"]
    training.save_weights_for_sampler("after-delete").result(timeout=60)
    assert registry.usage(owner)["checkpoint_bytes"] == before


def test_expired_checkpoints_give_their_bytes_back(quota_stack: Stack) -> None:
    registry = quota_stack.registry()
    key = registry.create_key("ttl")
    owner = owner_of(quota_stack, key)
    service = tinker.ServiceClient(base_url=quota_stack.url, api_key=key)
    training = service.create_lora_training_client(TINY_MODEL, rank=4).result(timeout=120)
    path = training.save_weights_for_sampler("brief").result(timeout=60).path
    assert registry.usage(owner)["checkpoint_bytes"] > 0
    service.create_rest_client().set_checkpoint_ttl_from_tinker_path(path, 1).result(timeout=30)
    wait_for(lambda: registry.usage(owner)["checkpoint_bytes"] == 0, 30, "the TTL sweep to give the bytes back")
    assert not Path(quota_stack.data_dir / "checkpoints" / training.model_id / "sampler_weights" / "brief").exists()


def test_a_checkpoint_recorded_before_the_count_existed_never_takes_it_below_zero(redis_server) -> None:
    """Deployments upgraded with checkpoints already stored: deleting one that was never counted leaves 0."""
    from core.registry import Registry, checkpoint_bytes_key
    from core.settings import Settings

    registry = Registry(Settings.from_env({"TINKERBELL_BROKER_URL": redis_server.url(63)}))
    registry.redis.flushdb()
    old = {"checkpoint_id": "weights/old", "owner": "k1", "size_bytes": 500, "time": 0.0}
    registry.redis.hset("tb:ckpt:m:train:0", "weights/old", json.dumps(old))  # as written by the code before
    registry.add_checkpoint("m:train:0", {**old, "checkpoint_id": "weights/new", "size_bytes": 200})
    assert registry.usage("k1")["checkpoint_bytes"] == 200
    registry.delete_checkpoint("m:train:0", "weights/old")
    assert registry.redis.get(checkpoint_bytes_key("k1")) == "0"
    registry.delete_checkpoint("m:train:0", "weights/new")
    assert registry.usage("k1")["checkpoint_bytes"] == 0
