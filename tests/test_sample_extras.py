"""Sampling extras through the official SDK against the real stack, each equal to plain PEFT's full forward:
topk_sample_logprobs, target_prompt_logprobs (dense and sparse CSR), prompt_alt_tokens_k, in one batch with other
requests (other adapters, num_samples > 1); the JSON face answers the same; record_stability_info keeps the
sequence_ids a day; stable_reinforce is refused saying why."""

from __future__ import annotations

import os
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import requests
import tinker
import torch
from tinker import types

from core.errors import NotFound
from core.registry import LOCAL_OWNER
from tests.stackutil import TINY_MODEL

os.environ["TINKER_TELEMETRY"] = "0"
KEY = "tml-sample-extras"
PROMPTS = [[1, 504, 3158, 314, 260, 3575, 282], [1, 88, 4123, 17], [1, 2020, 17, 391, 9000, 12]]


@pytest.fixture(scope="module")
def service(stack) -> tinker.ServiceClient:
    client = tinker.ServiceClient(base_url=stack.url, api_key=KEY)
    yield client
    client.close("success").result(timeout=30)


@pytest.fixture(scope="module")
def adapters(stack, service) -> list[tuple[str, str]]:
    """Two adapters trained on different data (so they differ from each other and from the base model):
    (tinker:// sampler path, its directory on disk) each."""
    out = []
    for seed in (0, 1):
        training = service.create_lora_training_client(TINY_MODEL, rank=4, seed=seed).result(timeout=120)
        tokens = [1, *range(100 + 40 * seed, 112 + 40 * seed)]
        datum = tinker.Datum(
            model_input=tinker.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
        )
        for _ in range(3):
            training.forward_backward([datum], "cross_entropy").result(timeout=60)
            training.optim_step(types.AdamParams(learning_rate=5e-2)).result(timeout=60)
        path = training.save_weights_for_sampler(f"extras{seed}").result(timeout=60).path
        model_id, kind, name = path[len("tinker://") :].split("/")
        out.append((path, stack.registry().checkpoint(model_id, f"{kind}/{name}")["dir"]))
    return out


def reference_lsm(stack, tokens: list[int], adapter_dir: str | None) -> torch.Tensor:
    """Plain HF (+ PEFT) forward over tokens: (N - 1, V) log-softmax, row j the distribution of tokens[j + 1]."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(Path(stack.models_dir) / TINY_MODEL), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([tokens])).logits[0, :-1].log_softmax(-1)


def engine_stats(stack) -> dict:
    """The worker's engine counters from a heartbeat taken after now."""
    time.sleep(2.5)  # TINKERBELL_HEARTBEAT_S is 1 in test stacks
    [worker] = stack.registry().live_workers()
    return worker["engine"]["stats"]


def check_sequences(stack, prompt: list[int], adapter_dir: str | None, result, k: int) -> None:
    """Sampled logprobs and the top-k at each sampled position equal plain PEFT's over prompt + completion."""
    for seq in result.sequences:
        full = prompt + list(seq.tokens)
        lsm = reference_lsm(stack, full, adapter_dir)[len(prompt) - 1 :]  # (T, V)
        np.testing.assert_allclose(seq.logprobs, lsm.gather(-1, torch.tensor(seq.tokens)[:, None])[:, 0], atol=1e-4)
        if not k:
            assert seq.topk_logprobs is None
            continue
        values, ids = lsm.topk(k, dim=-1)
        assert [[t for t, _ in row] for row in seq.topk_logprobs] == ids.tolist()
        np.testing.assert_allclose([[v for _, v in row] for row in seq.topk_logprobs], values, atol=1e-4)


def expected_targets(prompt_lsm: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[L-1, K] logprob of each named id at its prompt position, 0.0 where the id is -1."""
    return prompt_lsm.gather(-1, ids.clamp(min=0)).masked_fill(ids < 0, 0.0)


def test_extras_in_one_batch_with_other_requests_equal_plain_peft(stack, service, adapters):
    (path_a, dir_a), (path_b, dir_b) = adapters
    sampler_a = service.create_sampling_client(model_path=path_a)
    sampler_b = service.create_sampling_client(model_path=path_b)
    base = service.create_sampling_client(base_model=TINY_MODEL)
    dense_ids = torch.tensor([[436, 2036], [5, -1], [-1, -1], [3158, 9000], [7, 8], [1, 2]])  # [len(P0) - 1, 2]
    sparse_ids = torch.full((len(PROMPTS[2]) - 1, 49152), -1, dtype=torch.int64)
    sparse_ids[1, 17], sparse_ids[3, 9000], sparse_ids[3, 12], sparse_ids[4, 0] = 17, 9000, 12, 0
    before = engine_stats(stack)["sample_batches"]
    # The first request decodes long enough that the others arrive meanwhile and are decoded in one batch.
    long = types.SamplingParams(max_tokens=300, temperature=0.0, stop=[])
    futures: list[Future] = [base.sample(types.ModelInput.from_ints(PROMPTS[1]), 1, long)]
    seeded = types.SamplingParams(max_tokens=6, temperature=0.9, top_k=50, seed=11, stop=[])
    asked = [
        (sampler_a, dir_a, PROMPTS[0], 3, seeded, {"topk_sample_logprobs": 4, "prompt_alt_tokens_k": 3}),
        (sampler_b, dir_b, PROMPTS[0], 1, types.SamplingParams(max_tokens=5, temperature=0.0, stop=[]), {}),
        (sampler_b, dir_b, PROMPTS[1], 2, seeded, {"topk_sample_logprobs": 2}),
        (base, None, PROMPTS[2], 2, types.SamplingParams(max_tokens=4, temperature=0.0, stop=[]), {}),
    ]
    extras = [
        {**asked[0][5], "target_prompt_logprobs": types.TensorData.from_torch(dense_ids)},
        {},
        asked[2][5],
        {
            "topk_sample_logprobs": 5,
            "prompt_alt_tokens_k": 2,
            "target_prompt_logprobs": types.TensorData.from_torch_sparse(sparse_ids, pad_value=-1),
        },
    ]
    for (client, _, prompt, n, params, _), extra in zip(asked, extras):
        futures.append(client.sample(types.ModelInput.from_ints(prompt), n, params, **extra))
    results = [f.result(timeout=300) for f in futures]
    batches = engine_stats(stack)["sample_batches"] - before
    assert batches <= 3, f"5 requests in {batches} batches: none shared a generation loop"  # 2 seen here
    for (_, adapter_dir, prompt, n, params, _), extra, result in zip(asked, extras, results[1:]):
        assert len(result.sequences) == n
        check_sequences(stack, prompt, adapter_dir, result, extra.get("topk_sample_logprobs", 0))
        prompt_lsm = reference_lsm(stack, prompt, adapter_dir)  # (L-1, V)
        alt_k = extra.get("prompt_alt_tokens_k", 0)
        if alt_k:
            draws = result.prompt_alt_tokens.tokens.to_torch()
            assert tuple(draws.shape) == (len(prompt) - 1, alt_k)
            np.testing.assert_allclose(
                result.prompt_alt_tokens.logprobs.to_torch(), prompt_lsm.gather(-1, draws), atol=1e-4
            )
            if params.temperature == 0:
                assert (draws == prompt_lsm.argmax(-1, keepdim=True)).all()
        else:
            assert result.prompt_alt_tokens is None
        if "target_prompt_logprobs" not in extra:
            assert result.target_prompt_logprobs is None
    dense = results[1].target_prompt_logprobs
    assert dense.sparse_crow_indices is None and dense.shape == [len(PROMPTS[0]) - 1, 2]
    np.testing.assert_allclose(
        dense.to_torch(), expected_targets(reference_lsm(stack, PROMPTS[0], dir_a), dense_ids), atol=1e-4
    )
    sparse = results[4].target_prompt_logprobs  # answered in the request's layout: only the named cells
    assert sparse.sparse_crow_indices is not None and len(sparse.data) == 4 and sparse.shape == list(sparse_ids.shape)
    got = sparse.to_torch()  # dense, 0.0 in every cell not named
    lsm = reference_lsm(stack, PROMPTS[2], None)
    for row, token in ((1, 17), (3, 9000), (3, 12), (4, 0)):
        assert got[row, token] == pytest.approx(float(lsm[row, token]), abs=1e-4)
    assert int((got != 0).sum()) == 4


def test_the_json_face_answers_the_same_as_the_protobuf_one(stack, service, adapters):
    path, _ = adapters[0]
    params = {"max_tokens": 4, "temperature": 1.0, "seed": 21, "stop": []}
    ids = [[5, -1], [-1, 4123], [9, 10]]
    sdk = (
        service.create_sampling_client(model_path=path)
        .sample(
            types.ModelInput.from_ints(PROMPTS[1]),
            2,
            types.SamplingParams(**params),
            topk_sample_logprobs=3,
            target_prompt_logprobs=types.TensorData.from_torch(torch.tensor(ids)),
            prompt_alt_tokens_k=2,
        )
        .result(timeout=120)
    )
    body = {
        "model_path": path,
        "prompt": PROMPTS[1],
        "num_samples": 2,
        "sampling_params": params,
        "topk_sample_logprobs": 3,
        "target_prompt_logprobs": ids,
        "prompt_alt_tokens_k": 2,
    }
    answer = requests.post(stack.url + "/api/v1/sample", json=body, headers={"X-API-Key": KEY}, timeout=120).json()
    for mine, theirs in zip(answer["sequences"], sdk.sequences):
        assert mine["tokens"] == list(theirs.tokens)
        assert [[t for t, _ in row] for row in mine["topk_logprobs"]] == [
            [t for t, _ in r] for r in theirs.topk_logprobs
        ]
        np.testing.assert_allclose(
            [[v for _, v in row] for row in mine["topk_logprobs"]],
            [[v for _, v in r] for r in theirs.topk_logprobs],
            atol=1e-6,
        )
    target = answer["target_prompt_logprobs"]
    assert target["shape"] == [3, 2] and target["dtype"] == "float32"
    np.testing.assert_allclose(target["data"], sdk.target_prompt_logprobs.to_numpy().reshape(-1), atol=1e-6)
    assert target["data"][1] == 0.0 and target["data"][2] == 0.0  # the -1 cells
    alt = answer["prompt_alt_tokens"]
    assert alt["tokens"]["data"] == sdk.prompt_alt_tokens.tokens.to_numpy().reshape(-1).tolist()
    np.testing.assert_allclose(
        alt["logprobs"]["data"], sdk.prompt_alt_tokens.logprobs.to_numpy().reshape(-1), atol=1e-6
    )


def test_a_target_id_outside_the_vocabulary_fails_the_future_naming_the_field(service, adapters):
    sampler = service.create_sampling_client(model_path=adapters[0][0])
    ids = types.TensorData.from_torch(torch.tensor([[5], [49152], [7]]))
    future = sampler.sample(
        types.ModelInput.from_ints(PROMPTS[1]), 1, types.SamplingParams(max_tokens=1), target_prompt_logprobs=ids
    )
    with pytest.raises(Exception, match=r"target_prompt_logprobs: token id 49152 is outside the vocabulary"):
        future.result(timeout=120)


def test_record_stability_info_keeps_each_sequence_id_for_a_day_for_its_key_only(stack, service, adapters):
    path, _ = adapters[1]
    params = types.SamplingParams(max_tokens=3, temperature=1.0, seed=4, stop=[])
    recorded = service.create_sampling_client(model_path=path, record_stability_info=True)
    result = recorded.sample(types.ModelInput.from_ints(PROMPTS[0]), 2, params).result(timeout=120)
    registry = stack.registry()
    ids = [seq.sequence_id for seq in result.sequences]
    assert len(set(ids)) == 2
    for index, (sequence_id, seq) in enumerate(zip(ids, result.sequences)):
        record = registry.sampled_sequence(sequence_id, LOCAL_OWNER)
        assert record["index"] == index
        assert 86400 - 120 < registry.redis.ttl(f"tb:sequence:{sequence_id}") <= 86400
        # The record leads to this very sequence: sample `index` of request `request_id`'s result.
        stored = requests.post(
            stack.url + "/retrieve_future", json={"request_id": record["request_id"]}, headers={"X-API-Key": KEY}
        ).json()
        assert stored["sequences"][index]["tokens"] == list(seq.tokens)
        with pytest.raises(NotFound, match="sequence_id"):
            registry.sampled_sequence(sequence_id, "another-key")
    plain = service.create_sampling_client(model_path=path).sample(types.ModelInput.from_ints(PROMPTS[0]), 1, params)
    [seq] = plain.result(timeout=120).sequences
    assert seq.sequence_id and not registry.redis.exists(f"tb:sequence:{seq.sequence_id}")


def test_stable_reinforce_is_refused_saying_its_formula_is_not_public_and_naming_the_losses(service):
    training = service.create_lora_training_client(TINY_MODEL, rank=4).result(timeout=120)
    tokens = [1, 5, 17, 42, 99]
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "logprobs": [0.0] * 4, "advantages": [1.0] * 4},
    )
    with pytest.raises(Exception, match=r"stable_reinforce.*formula is not public.*importance_sampling"):
        training.forward_backward([datum], "stable_reinforce").result(timeout=60)
    training.forward_backward([datum], "importance_sampling").result(timeout=60)  # the client goes on
