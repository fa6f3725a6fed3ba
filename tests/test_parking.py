"""Idle and finished sessions: their adapters are parked (state saved, memory freed) and restored on the next request,
with training results identical to never parking; a finished session refuses new requests. Real stack, tinker SDK."""

from __future__ import annotations

import pytest
import requests
import tinker
import torch
from safetensors.torch import load_file

from tests.stackutil import TINY_MODEL, wait_for
from tests.test_tinker_sdk import make_datum

KEY = "tml-parking"
ADAM = tinker.AdamParams(learning_rate=1e-2)


@pytest.fixture(scope="module")
def stack(make_stack):
    # Idle after 8 s without a request or heartbeat (the SDK heartbeats every 10 s); swept twice a second.
    return make_stack(1, {"TINKERBELL_AUTH": "off", "TINKERBELL_SESSION_IDLE_S": "8", "TINKERBELL_SWEEP_S": "0.5"})


def steps(training: tinker.TrainingClient, datums: list[tinker.Datum]) -> list[float]:
    losses = []
    for datum in datums:
        fwdbwd = training.forward_backward([datum], "cross_entropy")
        optim = training.optim_step(ADAM)
        losses.append(fwdbwd.result(timeout=120).metrics["loss:sum"])
        optim.result(timeout=120)
    return losses


def saved_state(stack, training: tinker.TrainingClient, name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights and its AdamW state (exp_avg, exp_avg_sq, step per parameter), as saved by save_state."""
    path = training.save_state(name).result(timeout=120).path
    model_id, kind, checkpoint = path.removeprefix("tinker://").split("/")
    directory = stack.data_dir / "checkpoints" / model_id / kind / checkpoint
    state = dict(load_file(str(directory / "adapter_model.safetensors")))
    optimizer = torch.load(directory / "optimizer.pt", weights_only=True)["state"]
    for index, moments in optimizer.items():
        state.update({f"adam.{index}.{k}": torch.as_tensor(v) for k, v in moments.items()})
    return state


def wait_parked(registry, model_id: str, timeout: float = 90) -> None:
    wait_for(lambda: registry.placement(model_id).status == "parked", timeout, f"{model_id} parked")


def test_parked_adapter_resumes_training_with_results_identical_to_never_parking(stack):
    service = tinker.ServiceClient(base_url=stack.url, api_key=KEY)
    registry = stack.registry()
    datums = [make_datum(seed) for seed in range(6)]
    reference = service.create_lora_training_client(TINY_MODEL, rank=4, seed=11).result(timeout=120)
    parked = service.create_lora_training_client(TINY_MODEL, rank=4, seed=11).result(timeout=120)

    want = steps(reference, datums)
    want_state = saved_state(stack, reference, "end")
    assert registry.placement(reference.model_id).epoch == 1, "the reference was parked mid-run: raise the idle time"

    got = steps(parked, datums[:3])
    wait_parked(registry, parked.model_id)
    record = registry.model_any(parked.model_id)
    assert record["parked_reason"] == "session idle" and record["worker"] == ""
    assert parked.model_id not in registry.worker_adapters("w0")
    assert (stack.data_dir / "autosave" / parked.model_id / "optimizer.pt").exists()
    # Its memory is freed: the worker's backend reports holding only the adapters the registry says it holds.
    wait_for(
        lambda: all(w["loaded_adapters"] == len(w["adapters"]) for w in registry.live_workers()), 30, "memory freed"
    )
    assert requests.get(stack.url + "/status.json", timeout=10).json()["totals"]["adapters_parked"] >= 1

    got += steps(parked, datums[3:])  # the first request places it again; it is restored from its autosave
    placement = registry.placement(parked.model_id)
    assert placement.epoch == 2 and placement.worker == "w0"
    assert got == want
    got_state = saved_state(stack, parked, "end")
    assert sorted(got_state) == sorted(want_state)
    for name, tensor in want_state.items():
        assert torch.equal(got_state[name], tensor), name
    service.close("success").result(timeout=30)


def test_closed_session_is_parked_at_once_and_refuses_new_requests(stack):
    service = tinker.ServiceClient(base_url=stack.url, api_key=KEY)
    registry = stack.registry()
    training = service.create_lora_training_client(TINY_MODEL, rank=4, seed=1).result(timeout=120)
    steps(training, [make_datum(1)])
    session_id = service.holder.get_session_id()
    service.close("success").result(timeout=30)

    wait_parked(registry, training.model_id)
    assert registry.model_any(training.model_id)["parked_reason"] == "session finished"

    with pytest.raises(RuntimeError, match="closed"):  # the SDK itself sends nothing more on a closed client ...
        training.forward_backward([make_datum(2)], "cross_entropy").result(timeout=60)
    headers = {"X-API-Key": KEY}  # ... and the service refuses whatever another client sends for it
    step = requests.post(
        stack.url + "/api/v1/optim_step",
        json={"model_id": training.model_id, "seq_id": 3, "adam_params": {"learning_rate": 1e-2}},
        headers=headers,
    )
    assert step.status_code == 410 and "was finished (ServiceClient.close)" in step.json()["error"], step.text
    beat = requests.post(stack.url + "/api/v1/session_heartbeat", json={"session_id": session_id}, headers=headers)
    assert beat.status_code == 410 and "was finished" in beat.json()["error"], beat.text
    create = requests.post(
        stack.url + "/api/v1/create_model",
        json={"session_id": session_id, "model_seq_id": 5, "base_model": TINY_MODEL, "lora_config": {"rank": 4}},
        headers=headers,
    )
    assert create.status_code == 410 and "session_id" in create.json()["error"], create.text
    assert registry.placement(training.model_id).status == "parked"  # a refused request does not place it again
