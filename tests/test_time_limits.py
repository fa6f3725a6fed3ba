"""A hung request cannot block an adapter forever (real stack, native client over HTTP): with a 2 s
TINKERBELL_TRAIN_TIME_LIMIT_S, a forward_backward whose pass hangs (a custom loss that sleeps 8 s on the engine
thread) fails at its limit, a request queued behind it fails unrun at its own, the hung one's gradients are
discarded when its pass returns (the adapter's weights are exactly as before, and its next optim_step says so), and
the worker goes on serving both adapters."""

from __future__ import annotations

import time

import numpy as np
import pytest
import requests

from client import LossFnOutput, TinkerbellClient, UserInputError
from tests.stackutil import TINY_MODEL, Stack, wait_for
from tests.test_service import logprobs_of

DATUM = {"model_input": [1, 2, 3, 4], "loss_fn_inputs": {"target_tokens": [2, 3, 4, 5], "weights": [1.0] * 4}}


def hangs(model_outputs, loss_fn_inputs, attention_mask):
    time.sleep(8.0)  # on the engine thread: every other request of this worker waits behind it
    return LossFnOutput(loss=-model_outputs["logprobs"].sum())


@pytest.fixture(scope="module")
def limits_stack(make_stack) -> Stack:
    return make_stack(
        1,
        {
            "TINKERBELL_AUTH": "off",
            "TINKERBELL_ALLOW_CUSTOM_CODE": "1",
            "TINKERBELL_CUSTOM_LOSS_TIMEOUT_S": "60",
            "TINKERBELL_TRAIN_TIME_LIMIT_S": "2",
        },
    )


def running(stack: Stack) -> list[str]:
    return [w["running"] for w in requests.get(stack.url + "/status.json", timeout=5).json()["workers"]]


def logprobs(tb: TinkerbellClient, model_id: str) -> np.ndarray:
    return logprobs_of(tb.forward(model_id, [DATUM]).result(60)["loss_fn_outputs"][0])


def test_a_hung_forward_backward_fails_at_its_limit_is_undone_and_the_worker_goes_on(limits_stack: Stack) -> None:
    tb = TinkerbellClient(limits_stack.url, api_key="tml-limits")
    hung_id = tb.add_lora(base_model=TINY_MODEL, rank=4, seed=1).result(120)["model_id"]
    other_id = tb.add_lora(base_model=TINY_MODEL, rank=4, seed=2).result(120)["model_id"]
    tb.register_custom_loss(hangs, name="hangs")
    before = logprobs(tb, hung_id)

    hung = tb.forward_backward(hung_id, [DATUM], loss_fn="hangs")
    wait_for(lambda: running(limits_stack) != ["idle"], 10, "the hanging pass to start")
    queued = tb.forward_backward(other_id, [DATUM])  # behind the hung pass on the one engine thread
    with pytest.raises(UserInputError) as hung_error:
        hung.result(60)
    message = str(hung_error.value)
    assert "TINKERBELL_TRAIN_TIME_LIMIT_S=2" in message and "undone when that call returns" in message, message
    with pytest.raises(UserInputError) as queued_error:
        queued.result(60)
    message = str(queued_error.value)
    assert "TINKERBELL_TRAIN_TIME_LIMIT_S=2" in message and "not started" in message, message

    wait_for(lambda: running(limits_stack) == ["idle"], 30, "the hung pass to return")
    # the worker goes on: the other adapter trains, and the hung one is as it was before that request
    assert tb.forward_backward(other_id, [DATUM]).result(60)["metrics"]["loss:sum"] > 0
    tb.optim_step(other_id, learning_rate=1e-2).result(60)
    with pytest.raises(UserInputError, match="were discarded when one of them ran past its time limit"):
        tb.optim_step(hung_id, learning_rate=1e-2).result(60)
    np.testing.assert_array_equal(logprobs(tb, hung_id), before)
    assert tb.forward_backward(hung_id, [DATUM]).result(60)["metrics"]["loss:sum"] > 0
    tb.optim_step(hung_id, learning_rate=1e-2).result(60)
    assert not np.array_equal(logprobs(tb, hung_id), before)  # and it trains again
