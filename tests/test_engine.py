"""The worker engine on the real stack: many adapters' requests share a pass, seq_id order holds whatever order
the pool threads deliver in, a re-delivered request applies once, a poisoned request fails alone, and concurrent
sample calls share a generation loop. Official SDK and the native client over HTTP, real workers and Redis."""

from __future__ import annotations

import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tinker
from tinker import types

from client import TinkerbellClient, UserInputError
from core.registry import LOCAL_OWNER
from core.wire import encode_array
from tests.stackutil import TINY_MODEL, engine_stats_after, wait_for

os.environ["TINKER_TELEMETRY"] = "0"
KEY = "tml-engine-tests"
RANKS = [2, 4, 8, 4, 2, 8, 4, 2]
ADAM = types.AdamParams(learning_rate=1e-3)  # Adam normalises: float noise on near-zero gradients scales with lr
STEPS = 3


def sft_datum(seed: int, length: int) -> tinker.Datum:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 300, size=length + 1)
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1].tolist()),
        loss_fn_inputs={"target_tokens": tokens[1:].tolist(), "weights": np.ones(length, np.float32).tolist()},
    )


def rl_datum(seed: int, length: int) -> tinker.Datum:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 300, size=length + 1)
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1].tolist()),
        loss_fn_inputs={
            "target_tokens": tokens[1:].tolist(),
            "logprobs": (-rng.random(length) * 3).astype(np.float32).tolist(),
            "advantages": rng.normal(size=length).astype(np.float32).tolist(),
        },
    )


def plan(i: int) -> tuple[int, str, list[tinker.Datum]]:
    """Adapter i's rank, loss and batch: ranks and losses differ between adapters, lengths too."""
    loss = ["cross_entropy", "importance_sampling", "ppo", "cross_entropy"][i % 4]
    make = sft_datum if loss == "cross_entropy" else rl_datum
    return RANKS[i], loss, [make(100 * i + j, 24 + 8 * j) for j in range(3)]


def train(service: tinker.ServiceClient, i: int, start: threading.Barrier | None = None) -> np.ndarray:
    """STEPS steps of adapter i through the SDK; returns its logprobs on a probe batch afterwards."""
    rank, loss, batch = plan(i)
    tc = service.create_lora_training_client(TINY_MODEL, rank=rank, seed=1000 + i).result(timeout=120)
    if start is not None:
        start.wait(timeout=120)
    for _ in range(STEPS):
        fwdbwd = tc.forward_backward(batch, loss)
        step = tc.optim_step(ADAM)
        fwdbwd.result(timeout=120)
        step.result(timeout=120)
    probe = tc.forward([sft_datum(7, 20)], "cross_entropy").result(timeout=120)
    return np.asarray(probe.loss_fn_outputs[0]["logprobs"].tolist(), dtype=np.float32)


def engine_stats(stack) -> dict:
    [worker] = stack.registry().live_workers()
    return worker.get("engine", {}).get("stats", {})


@pytest.fixture(scope="module")
def engine_stack(make_stack):
    return make_stack(1, {"TINKERBELL_AUTH": "off"})


def test_eight_sdk_clients_share_passes_and_each_adapter_equals_training_it_alone(engine_stack, make_stack):
    service = tinker.ServiceClient(base_url=engine_stack.url, api_key=KEY)
    start = threading.Barrier(len(RANKS))
    with ThreadPoolExecutor(len(RANKS)) as pool:
        together = list(pool.map(lambda i: train(service, i, start), range(len(RANKS))))
    wait_for(
        lambda: engine_stats(engine_stack).get("multi_adapter_passes", 0) > 0, 10, "a heartbeat with a shared pass"
    )
    stats = engine_stats(engine_stack)
    assert stats["max_adapters_per_pass"] > 1, stats

    alone_stack = make_stack(1, {"TINKERBELL_AUTH": "off"})
    alone_service = tinker.ServiceClient(base_url=alone_stack.url, api_key=KEY)
    for i, logprobs in enumerate(together):
        np.testing.assert_allclose(logprobs, train(alone_service, i), atol=1e-5, rtol=0, err_msg=f"adapter {i}")


def native_datum(seed: int, length: int = 16) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 300, size=length + 1)
    return {"model_input": tokens[:-1].tolist(), "loss_fn_inputs": {"target_tokens": tokens[1:].tolist()}}


def wire_datum(datum: dict) -> dict:
    inputs = datum["loss_fn_inputs"]
    return {
        "tokens": encode_array(datum["model_input"], "int64"),
        "loss_fn_inputs": {k: encode_array(v) for k, v in inputs.items()},
    }


def inspector(stack):
    """`celery inspect` against this stack's broker, as an operator runs it."""
    from celery import Celery

    app = Celery("inspect", broker=stack.redis.url(stack.db), set_as_current=False)
    app.conf.update(accept_content=["msgpack", "json"], result_accept_content=["msgpack", "json"])
    return app.control.inspect(timeout=2.0)


def first_logprobs(result: dict, i: int = 0) -> np.ndarray:
    return np.asarray(result["loss_fn_outputs"][i]["logprobs"]["data"], dtype=np.float32)


def publish_directly(stack, task: str, kwargs: dict, request_id: str, queue: str) -> None:
    """Publish a task onto an adapter's queue with Celery's send_task, without the API's ordering (as a redelivery
    or a race would)."""
    from core.settings import Settings
    from tasks.celery_app import make_app

    app = make_app(Settings.from_env(stack.env))
    try:
        app.send_task(task, kwargs=kwargs, task_id=request_id, queue=queue)
    finally:
        app.close()


def test_out_of_order_delivery_runs_in_seq_order_and_a_resent_request_applies_once(engine_stack):
    from tasks.celery_app import adapter_queue

    tb = TinkerbellClient(engine_stack.url, api_key=KEY)
    reference = TinkerbellClient(engine_stack.url, api_key=KEY)
    data = [native_datum(s) for s in range(3)]
    probe = [native_datum(99)]

    ref_id = reference.add_lora(rank=4, seed=5).result(120)["model_id"]
    reference.forward_backward(ref_id, data).result(60)
    reference.optim_step(ref_id, learning_rate=5e-2).result(60)
    expected = reference.forward(ref_id, probe).result(60)["loss_fn_outputs"][0]["logprobs"]

    model_id = tb.add_lora(rank=4, seed=5).result(120)["model_id"]
    registry, queue = engine_stack.registry(), adapter_queue(model_id)
    ids = {1: str(uuid.uuid4()), 2: str(uuid.uuid4())}
    for seq, kind in ((1, "forward_backward"), (2, "optim_step")):  # admitted (as the API does), not yet queued
        registry.submit(model_id, seq, ids[seq], "", queue, LOCAL_OWNER, kind)
    step = {
        "model_id": model_id,
        "seq_id": 2,
        "adam_params": {
            "learning_rate": 5e-2,
            "beta1": 0.9,
            "beta2": 0.95,
            "eps": 1e-12,
            "weight_decay": 0.0,
            "grad_clip_norm": 0.0,
        },
    }
    fwdbwd = {
        "model_id": model_id,
        "seq_id": 1,
        "data": [wire_datum(d) for d in data],
        "loss_fn": "cross_entropy",
        "loss_fn_config": {},
        "forward_only": False,
    }
    publish_directly(engine_stack, "tinkerbell.optim_step", step, ids[2], queue)  # seq 2 first
    # While the optim_step waits in the engine for seq 1, the worker's consumer is free: `inspect active` answers
    # at once and lists it (on the solo pool a busy worker could not answer at all).
    active: dict = {}
    wait_for(
        lambda: ids[2] in str(active.update(inspector(engine_stack).active() or {}) or active),
        20,
        "the held optim_step in `inspect active`",
    )
    publish_directly(engine_stack, "tinkerbell.forward_backward", fwdbwd, ids[1], queue)
    tb.retrieve_future(ids[2]).result(60)
    tb.retrieve_future(ids[1]).result(60)
    tb._seq[model_id] = 2
    after_step = first_logprobs(tb.forward(model_id, probe).result(60))
    np.testing.assert_allclose(after_step, first_logprobs({"loss_fn_outputs": [{"logprobs": expected}]}), atol=1e-6)

    resent = str(uuid.uuid4())  # the same forward_backward (seq 1) delivered again under another id
    publish_directly(engine_stack, "tinkerbell.forward_backward", fwdbwd, resent, queue)
    registry.submit(model_id, 4, resent, "", queue, LOCAL_OWNER, "forward_backward")  # only to record its future
    with pytest.raises(Exception, match="already applied"):
        tb.retrieve_future(resent).result(60)
    tb._seq[model_id] = 4
    tb.optim_step(model_id, learning_rate=5e-2).result(60)  # would apply the resent gradients if they had been kept
    tb._seq[model_id] = 5
    unchanged = first_logprobs(tb.forward(model_id, probe).result(60))
    np.testing.assert_allclose(unchanged, after_step, atol=1e-6)


def test_a_poisoned_request_in_a_mixed_batch_fails_alone(engine_stack):
    clients = [TinkerbellClient(engine_stack.url, api_key=KEY) for _ in range(4)]
    model_ids = [c.add_lora(rank=4, seed=20 + i).result(120)["model_id"] for i, c in enumerate(clients)]
    data = [[native_datum(50 + i), native_datum(60 + i, 30)] for i in range(4)]
    poisoned = [
        {"model_input": [1, 2, 10**6], "loss_fn_inputs": {"target_tokens": [2, 3, 4]}}
    ]  # outside the vocabulary

    def round_trip(i: int) -> list:
        c, m = clients[i], model_ids[i]
        batch = poisoned if i == 2 else data[i]
        futures = [c.forward_backward(m, batch), c.optim_step(m, learning_rate=1e-2), c.forward(m, data[i])]
        out = []
        for f in futures:
            try:
                out.append(f.result(60))
            except UserInputError as exc:
                out.append(exc)
        return out

    with ThreadPoolExecutor(4) as pool:
        mixed = list(pool.map(round_trip, range(4)))
    assert isinstance(mixed[2][0], UserInputError) and "outside the vocabulary" in str(mixed[2][0])

    solo_clients = [TinkerbellClient(engine_stack.url, api_key=KEY) for _ in range(4)]
    for i in (0, 1, 3):
        c = solo_clients[i]
        m = c.add_lora(rank=4, seed=20 + i).result(120)["model_id"]
        first = c.forward_backward(m, data[i]).result(60)
        c.optim_step(m, learning_rate=1e-2).result(60)
        solo = c.forward(m, data[i]).result(60)
        assert mixed[i][0]["metrics"]["loss:sum"] == pytest.approx(first["metrics"]["loss:sum"], rel=1e-5)
        for k in range(len(data[i])):
            np.testing.assert_allclose(first_logprobs(mixed[i][0], k), first_logprobs(first, k), atol=1e-5)
            np.testing.assert_allclose(first_logprobs(mixed[i][2], k), first_logprobs(solo, k), atol=1e-5)


def test_sixty_four_concurrent_samples_share_generation_loops(engine_stack):
    tb = TinkerbellClient(engine_stack.url, api_key=KEY)
    paths = []
    for i in range(8):
        m = tb.add_lora(rank=4, seed=40 + i).result(120)["model_id"]
        tb.forward_backward(m, [native_datum(200 + i, 20)]).result(60)
        tb.optim_step(m, learning_rate=0.5).result(60)  # large steps, so each adapter greedily says something else
        paths.append(tb.save_state(m, f"s{i}", for_sampler=True).result(60)["path"])
    prompts = [[1 + (j * 7) % 250, 2 + j % 11, 3] for j in range(64)]
    solo = [tb.sample(prompts[j], model_path=paths[j % 8], max_tokens=8, temperature=0.0).result(60) for j in range(64)]
    assert len({tuple(solo[j]["sequences"][0]["tokens"]) for j in range(8)}) > 1  # the adapters really differ
    before = engine_stats_after(engine_stack, time.time())
    with ThreadPoolExecutor(64) as pool:
        together = list(
            pool.map(
                lambda j: tb.sample(prompts[j], model_path=paths[j % 8], max_tokens=8, temperature=0.0).result(120),
                range(64),
            )
        )
    after = engine_stats_after(engine_stack, time.time())
    for j in range(64):
        assert together[j]["sequences"][0]["tokens"] == solo[j]["sequences"][0]["tokens"], j
    assert after["sample_batches"] - before["sample_batches"] < 64, (before, after)
    assert after["max_requests_per_sample_batch"] > 1


def test_training_runs_between_the_decode_steps_of_a_long_sample_batch(engine_stack):
    """A long sample batch is advanced a slice per engine tick: a forward_backward sent while it decodes finishes
    before it (it used to wait for the whole batch), and the batch then completes."""
    tb = TinkerbellClient(engine_stack.url, api_key=KEY)
    model_id = tb.add_lora(rank=4, seed=77).result(120)["model_id"]
    tb.forward_backward(model_id, [native_datum(1, 20)]).result(60)  # warm
    big = tb.sample([1, 2, 3], num_samples=64, max_tokens=500, temperature=1.0, stop=[], seed=0)

    def sampling() -> bool:
        [worker] = engine_stack.registry().live_workers()
        return "sample" in str((worker.get("engine") or {}).get("busy"))

    wait_for(sampling, 60, "the worker decoding the big sample batch")
    fwd = tb.forward_backward(model_id, [native_datum(2, 20)]).result(60)
    assert fwd["metrics"]["loss:sum"] > 0
    with pytest.raises(TimeoutError):
        big.result(timeout=0.1)  # still decoding: the forward_backward did not wait for it
    out = big.result(300)
    assert len(out["sequences"]) == 64 and all(len(s["tokens"]) == 500 for s in out["sequences"])
