"""The API restarted: the real gunicorn process is sent SIGKILL or SIGTERM and started again on its port; futures made
before it, finished or still pending, are retrieved after it, through the official SDK's own futures and over HTTP,
with the results they would have had without the restart."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import requests
import tinker
from tinker import types

from client import TinkerbellClient
from tests.stackutil import TINY_MODEL

os.environ["TINKER_TELEMETRY"] = "0"
KEY = "tml-api-restart"
ADAM = types.AdamParams(learning_rate=1e-2)


def sdk_datum(seed: int, length: int = 12) -> tinker.Datum:
    tokens = np.random.default_rng(seed).integers(1, 300, size=length + 1).tolist()
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length},
    )


def native_datum(datum: tinker.Datum) -> dict:
    return {
        "model_input": datum.model_input.to_ints(),
        "loss_fn_inputs": {k: v.tolist() for k, v in datum.loss_fn_inputs.items()},
    }


def retrieve_over_http(stack, request_id: str) -> dict:
    """The Tinker face's retrieve_future, re-polled on try_again as the SDK does."""
    for _ in range(60):
        answer = requests.post(
            stack.url + "/api/v1/retrieve_future",
            json={"request_id": request_id},
            headers={"X-API-Key": KEY},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        result = answer.json()
        if result.get("type") != "try_again":
            return result
    raise AssertionError(f"{request_id} still pending")


@pytest.fixture(scope="module")
def restart_stack(make_stack):
    return make_stack(1, {"TINKERBELL_AUTH": "off"})


def expected_losses(stack, batch: list[tinker.Datum], seed: int) -> list[float]:
    """fwd/bwd, optim_step, fwd/bwd on a fresh adapter of the same seed, with no restart in between."""
    tb = TinkerbellClient(stack.url, api_key=KEY)
    model_id = tb.add_lora(rank=4, seed=seed).result(120)["model_id"]
    data = [native_datum(d) for d in batch]
    first = tb.forward_backward(model_id, data).result(60)["metrics"]["loss:sum"]
    tb.optim_step(model_id, **ADAM.model_dump()).result(60)
    return [first, tb.forward_backward(model_id, data).result(60)["metrics"]["loss:sum"]]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_futures_made_before_an_api_restart_are_retrieved_after_it(restart_stack, sig):
    stack = restart_stack
    batch = [sdk_datum(s) for s in range(3)]
    service = tinker.ServiceClient(base_url=stack.url, api_key=KEY)
    training = service.create_lora_training_client(TINY_MODEL, rank=4, seed=7).result(timeout=120)
    tb = TinkerbellClient(stack.url, api_key=KEY)
    native_model = tb.add_lora(rank=4, seed=7).result(120)["model_id"]
    finished = tb.forward_backward(native_model, [native_datum(d) for d in batch])
    finished_loss = finished.result(60)["metrics"]["loss:sum"]

    worker = stack.procs["worker-w0"]
    os.killpg(worker.pid, signal.SIGSTOP)  # what is submitted now stays pending until after the API is gone
    try:
        sdk_first = training.forward_backward(batch, "cross_entropy")
        sdk_step = training.optim_step(ADAM)
        sdk_second = training.forward_backward(batch, "cross_entropy")
        native_step = tb.optim_step(native_model, **ADAM.model_dump())
        native_second = tb.forward_backward(native_model, [native_datum(d) for d in batch])
        stack.stop_api(sig)
        with pytest.raises(requests.ConnectionError):  # the whole API is gone, its workers too
            requests.get(stack.url + "/healthz", timeout=5)
    finally:
        os.killpg(worker.pid, signal.SIGCONT)
    stack.start_api(port=stack.port)  # where the SDK's futures keep polling

    first, second = expected_losses(stack, batch, seed=7)
    assert second < first
    np.testing.assert_allclose(sdk_first.result(timeout=120).metrics["loss:sum"], first, rtol=1e-6)
    sdk_step.result(timeout=120)
    np.testing.assert_allclose(sdk_second.result(timeout=120).metrics["loss:sum"], second, rtol=1e-6)

    np.testing.assert_allclose(retrieve_over_http(stack, finished.request_id)["metrics"]["loss:sum"], first, rtol=1e-6)
    assert finished_loss == pytest.approx(first, rel=1e-6)
    assert "metrics" in retrieve_over_http(stack, native_step.request_id)
    np.testing.assert_allclose(
        retrieve_over_http(stack, native_second.request_id)["metrics"]["loss:sum"], second, rtol=1e-6
    )
