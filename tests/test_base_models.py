"""Several base models in one deployment (TINKERBELL_BASE_MODELS), through the official SDK against the real stack.

Two tiny models plus SmolLM2: an adapter trains on one while another is sampled (the cookbook's distillation
pattern), capabilities list exactly the configured models, others are refused, and a worker whose memory budget
holds one model unloads the idle one and reloads it later with equal numbers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
import tinker
from tinker import types

from client import TinkerbellClient
from tests.conftest import share_converted_model
from tests.stackutil import ROOT, TINY_MODEL, wait_for
from tests.tiny_qwen3 import TINY_QWEN2_NAME, TINY_QWEN3_NAME, build_tiny_qwen2, build_tiny_qwen3

os.environ["TINKER_TELEMETRY"] = "0"
KEY = "tml-base-models"
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SERVED = [TINY_MODEL, TINY_QWEN3_NAME, SMOL]
PROMPT = types.ModelInput.from_ints([1, 504, 3458, 282, 4649, 314, 2030, 47, 3121, 30])
ADAM = types.AdamParams(learning_rate=2e-2)
# A budget that holds tiny-qwen3 (12.1 MiB of float32 weights) or tiny-llama (3.0 MiB), not both.
ONE_MODEL_GB = 14 / 1024


def make_datum(seed: int, length: int = 12, vocab: int = 300) -> tinker.Datum:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=length + 1)
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1].tolist()),
        loss_fn_inputs={"target_tokens": tokens[1:].tolist(), "weights": np.ones(length, dtype=np.float32).tolist()},
    )


BATCH = [make_datum(s) for s in range(3)]


@pytest.fixture(scope="module")
def tiny_models(models_dir):
    """tiny-qwen3 beside the session's tiny-llama; tiny-qwen2 on disk too, never listed as served."""
    for name, build in ((TINY_QWEN3_NAME, build_tiny_qwen3), (TINY_QWEN2_NAME, build_tiny_qwen2)):
        if not (models_dir / name / "config.json").is_file():
            build(models_dir / name)
    return models_dir


@pytest.fixture(scope="module")
def served_models(tiny_models):
    share_converted_model(SMOL, tiny_models)
    return tiny_models


@pytest.fixture(scope="module")
def stack(make_stack, served_models):
    return make_stack(1, {"TINKERBELL_AUTH": "off", "TINKERBELL_BASE_MODELS": ",".join(SERVED)})


@pytest.fixture(scope="module")
def service(stack):
    client = tinker.ServiceClient(base_url=stack.url, api_key=KEY)
    yield client
    client.close("success").result(timeout=30)


def worker_row(stack, after: float) -> dict:
    """The worker's row on the public status page, from a heartbeat sent after `after` (epoch seconds)."""
    row: dict = {}

    def fresh() -> bool:
        nonlocal row
        doc = requests.get(stack.url + "/status.json", timeout=10).json()
        row = doc["workers"][0] if doc["workers"] else {}
        return bool(row) and doc["time"] - row["heartbeat_age_s"] > after + 0.1

    wait_for(fresh, 30, "a heartbeat")
    return row


def loaded(stack) -> list[str]:
    return worker_row(stack, time.time())["loaded_models"]


def test_capabilities_list_exactly_the_configured_models_and_none_is_loaded_before_its_first_use(stack, service):
    capabilities = service.get_server_capabilities()
    assert sorted(m.model_name for m in capabilities.supported_models) == sorted(SERVED)
    row = worker_row(stack, time.time())
    assert sorted(row["base_models"]) == sorted(SERVED)
    assert row["loaded_models"] == [] and row["model_bytes"] == {}


@pytest.mark.parametrize("name", [TINY_QWEN2_NAME, "nobody/nothing"])
def test_a_model_outside_the_list_is_a_bad_request_that_lists_the_served_ones(service, name):
    """tiny-qwen2 is on disk where the workers look, but not in TINKERBELL_BASE_MODELS: not served either."""
    with pytest.raises(tinker.BadRequestError) as training:  # a 400: the SDK does not retry it
        service.create_lora_training_client(name, rank=4).result(timeout=60)
    with pytest.raises(tinker.BadRequestError) as sampling:
        service.create_sampling_client(base_model=name).result(timeout=60)
    for error in (training, sampling):
        message = str(error.value)
        assert "base_model" in message and name in message and all(m in message for m in SERVED), message


def teacher_reference(stack, tokens: list[int]) -> np.ndarray:
    """SmolLM2's logprob of each prompt token after the first, computed with plain transformers in this process."""
    import torch
    from transformers import AutoModelForCausalLM

    from backends.models import resolve_model_dir
    from core.settings import Settings

    path = resolve_model_dir(SMOL, Settings.from_env(stack.env))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0, :-1].float()  # (N-1, V)
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0].numpy()


def test_an_adapter_trains_on_one_model_while_another_is_sampled_with_the_numbers_of_each_alone(stack, service):
    """The distillation pattern: a SmolLM2 teacher scores while a tiny-llama student trains, requests interleaved;
    the student's losses equal a student trained with no teacher around, the teacher's logprobs plain HF's."""
    teacher = service.create_sampling_client(base_model=SMOL).result(timeout=60)
    other = service.create_sampling_client(base_model=TINY_QWEN3_NAME).result(timeout=60)
    student = service.create_lora_training_client(TINY_MODEL, rank=4, seed=5).result(timeout=120)
    student_losses, teacher_scores, other_scores = [], [], []
    for _ in range(3):
        fwdbwd = student.forward_backward(BATCH, "cross_entropy")
        scored = teacher.compute_logprobs(PROMPT)  # in flight together with the student's step
        also = other.compute_logprobs(PROMPT)
        step = student.optim_step(ADAM)
        student_losses.append(fwdbwd.result(timeout=120).metrics["loss:sum"])
        teacher_scores.append(scored.result(timeout=120))
        other_scores.append(also.result(timeout=120))
        step.result(timeout=120)
    assert sorted(loaded(stack)) == sorted(SERVED)  # each loaded on its first use, all three side by side

    alone = service.create_lora_training_client(TINY_MODEL, rank=4, seed=5).result(timeout=120)
    alone_losses = []
    for _ in range(3):
        alone_losses.append(alone.forward_backward(BATCH, "cross_entropy").result(timeout=120).metrics["loss:sum"])
        alone.optim_step(ADAM).result(timeout=120)
    assert student_losses == alone_losses and student_losses[-1] < student_losses[0], (student_losses, alone_losses)

    assert all(scores == teacher_scores[0] for scores in teacher_scores)
    assert teacher_scores[0][0] is None
    expected = teacher_reference(stack, PROMPT.to_ints())
    np.testing.assert_allclose(np.asarray(teacher_scores[0][1:], dtype=np.float32), expected, rtol=0, atol=1e-4)
    assert other_scores[0] != teacher_scores[0]  # another model, other numbers
    row = worker_row(stack, time.time())
    assert row["model_memory_limit_bytes"] == 0 and set(row["model_bytes"]) == set(SERVED)


# ---- a memory budget that holds one model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def budget_stack(make_stack, tiny_models):
    return make_stack(
        1,
        {
            "TINKERBELL_AUTH": "off",
            "TINKERBELL_BASE_MODELS": f"{TINY_MODEL},{TINY_QWEN3_NAME}",
            "TINKERBELL_MODEL_MEMORY_GB": repr(ONE_MODEL_GB),
            "TINKERBELL_MODEL_IDLE_S": "0",  # idle as soon as nothing trains on it or samples from it
        },
    )


def loaded_within_budget(stack) -> list[str]:
    row = worker_row(stack, time.time())
    assert 0 < sum(row["model_bytes"].values()) <= row["model_memory_limit_bytes"] == int(ONE_MODEL_GB * 2**30), row
    return row["loaded_models"]


def test_a_budget_of_one_model_unloads_the_idle_one_and_reloads_it_with_equal_numbers(budget_stack):
    service = tinker.ServiceClient(base_url=budget_stack.url, api_key=KEY)
    tc = service.create_lora_training_client(TINY_MODEL, rank=4, seed=9).result(timeout=120)
    for _ in range(2):
        tc.forward_backward(BATCH, "cross_entropy").result(timeout=60)
        tc.optim_step(ADAM).result(timeout=60)
    state = tc.save_state("two").result(timeout=60).path
    trained = tc.save_weights_and_get_sampling_client().result(timeout=60)
    third = tc.forward_backward(BATCH, "cross_entropy").result(timeout=60).metrics
    tc.optim_step(ADAM).result(timeout=60)
    after_third = tc.forward(BATCH, "cross_entropy").result(timeout=60).metrics
    base_a = service.create_sampling_client(base_model=TINY_MODEL).result(timeout=60)
    base_b = service.create_sampling_client(base_model=TINY_QWEN3_NAME).result(timeout=60)
    first = {"trained": trained.compute_logprobs(PROMPT).result(timeout=60)}
    first["a"] = base_a.compute_logprobs(PROMPT).result(timeout=60)
    assert loaded_within_budget(budget_stack) == [TINY_MODEL]

    # An adapter's base model is never unloaded under it: the other model does not fit, and the error says why.
    with pytest.raises(tinker.RequestFailedError, match="TINKERBELL_MODEL_MEMORY_GB") as refused:
        base_b.compute_logprobs(PROMPT).result(timeout=60)
    assert "being trained" in str(refused.value), str(refused.value)
    assert loaded_within_budget(budget_stack) == [TINY_MODEL]

    TinkerbellClient(budget_stack.url, api_key=KEY).remove_lora(tc.model_id).result(60)  # the SDK has no remove
    first["b"] = base_b.compute_logprobs(PROMPT).result(timeout=60)  # A is idle now: unloaded to make room for B
    assert loaded_within_budget(budget_stack) == [TINY_QWEN3_NAME]
    assert trained.compute_logprobs(PROMPT).result(timeout=60) == first["trained"]  # A reloaded, B unloaded
    assert loaded_within_budget(budget_stack) == [TINY_MODEL]
    assert base_a.compute_logprobs(PROMPT).result(timeout=60) == first["a"]
    assert base_b.compute_logprobs(PROMPT).result(timeout=60) == first["b"] != first["a"]
    assert loaded_within_budget(budget_stack) == [TINY_QWEN3_NAME]

    # Training picks up from the saved state on a reloaded A exactly as the run that never unloaded went on.
    resumed = service.create_training_client_from_state_with_optimizer(state).result(timeout=120)
    assert loaded_within_budget(budget_stack) == [TINY_MODEL]
    assert resumed.forward_backward(BATCH, "cross_entropy").result(timeout=60).metrics == third
    resumed.optim_step(ADAM).result(timeout=60)
    assert resumed.forward(BATCH, "cross_entropy").result(timeout=60).metrics == after_third
    service.close("success").result(timeout=30)


UNLOAD_FREES = """
import gc, sys, weakref
from backends.base import LoraSpec, SamplingSpec
from backends.hf import get_base, loaded_models, torch_device
from backends.hf_sample import HFSamplingBackend
from backends.hf_train import HFTrainingBackend
from core.errors import UserError
from core.settings import Settings

models_dir, data_dir, a, b, budget = sys.argv[1:6]
settings = Settings(models_dir=models_dir, data_dir=data_dir, model_memory_gb=float(budget), model_idle_s=0)
trainer, sampler = HFTrainingBackend(settings), HFSamplingBackend(settings)
greedy = SamplingSpec(max_tokens=2, temperature=0.0)
trainer.create_adapter("m:train:0", a, LoraSpec(rank=4, seed=1))
weights = [weakref.ref(p) for p in trainer.trainable_parameters("m:train:0")]
trainer.save_state("m:train:0", data_dir + "/m", False)
before = sampler.sample(a, data_dir + "/m", [1, 2, 3], greedy)  # the sampler now holds A, with these weights on it
try:
    sampler.sample(b, None, [1, 2, 3], greedy)
    raise SystemExit("loaded b beside the trained a")
except UserError as exc:
    assert "TINKERBELL_MODEL_MEMORY_GB" in str(exc), exc
assert sorted(loaded_models(torch_device("cpu"))) == [a]
trainer.remove_adapter("m:train:0")
base_weights = [weakref.ref(p) for p in get_base(a, settings, torch_device("cpu")).model.parameters()]
sampler.sample(b, None, [1, 2, 3], greedy)
gc.collect()
assert sorted(loaded_models(torch_device("cpu"))) == [b]
alive = sum(w() is not None for w in base_weights + weights)
assert alive == 0, f"{alive} tensors of the unloaded model still referenced"
assert sampler.sample(a, data_dir + "/m", [1, 2, 3], greedy).sequences[0].tokens == before.sequences[0].tokens
print("ok")
"""


def test_an_unloaded_model_leaves_no_tensor_behind(tiny_models, tmp_path):
    """In a fresh process (this one's model cache holds other tests' models): after the unload, not one of the
    model's parameters (nor the removed adapter's) is still referenced anywhere, so its memory is free."""
    args = [str(tiny_models), str(tmp_path), TINY_MODEL, TINY_QWEN3_NAME, repr(ONE_MODEL_GB)]
    done = subprocess.run(
        [sys.executable, "-c", UNLOAD_FREES, *args],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
