"""HFSamplingBackend.sample_batch on the tiny Llama: many requests in one loop, each equal to its solo run."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from backends.base import SampleRequest, SampleResult, SamplingSpec
from core.errors import UserError
from core.settings import Settings
from tests.tiny_model import TINY_MODEL_NAME, build_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
OTHER_MODEL = "tinkerbell/tiny-llama-copy"  # the same weights under a second name: a second base model
VOCAB = 49152
PROMPTS = [
    [1, 504, 3158, 314, 260, 3575, 282, 4649, 47, 2],
    [1, 88, 4123],
    [1, 2020, 17, 391, 9000, 12, 7],
]
GREEDY = SamplingSpec(max_tokens=8, temperature=0.0, stop=[])


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    models = tmp_path_factory.mktemp("batch-models")
    tiny = build_tiny_model(models / "tinkerbell" / "tiny-llama")
    shutil.copytree(tiny, models / OTHER_MODEL)
    return Settings(models_dir=str(models), data_dir=str(tmp_path_factory.mktemp("batch-data")), device="cpu")


@pytest.fixture(scope="module")
def sampler(settings):
    from backends.hf_sample import HFSamplingBackend

    return HFSamplingBackend(settings)


@pytest.fixture(scope="module")
def adapters(settings, tmp_path_factory) -> list[str]:
    """Eight sampler adapters written by plain PEFT (attention, MLP and lm_head), LoRA B random so each one matters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from backends.hf import lora_targets

    root = tmp_path_factory.mktemp("batch-adapters")
    dirs = []
    for k in range(8):
        model = AutoModelForCausalLM.from_pretrained(
            str(Path(settings.models_dir) / TINY_MODEL_NAME), dtype=torch.float32
        )
        config = LoraConfig(r=4, lora_alpha=8.0, target_modules=lora_targets(True, True, True), lora_dropout=0.0)
        torch.manual_seed(k)
        model = get_peft_model(model, config)
        generator = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(str(root / f"adapter{k}"), save_embedding_layers=False)
        dirs.append(str(root / f"adapter{k}"))
    return dirs


def solo(sampler, request: SampleRequest) -> SampleResult:
    return sampler.sample(
        request.base_model,
        request.adapter_dir,
        request.prompt,
        request.params,
        request.num_samples,
        request.prompt_logprobs,
        request.topk_prompt_logprobs,
        topk_sample_logprobs=request.topk_sample_logprobs,
        target_prompt_cells=request.target_prompt_cells,
        prompt_alt_tokens_k=request.prompt_alt_tokens_k,
    )


def _assert_same_topk(batched: list | None, alone: list | None) -> None:
    assert (batched is None) == (alone is None)
    for b_row, a_row in zip(batched or [], alone or []):
        assert [t for t, _ in b_row] == [t for t, _ in a_row]
        np.testing.assert_allclose([v for _, v in b_row], [v for _, v in a_row], atol=1e-4, rtol=0)


def assert_same(batched: SampleResult, alone: SampleResult) -> None:
    """Same tokens, stop reasons and prompt draws; logprobs (sampled, prompt, top-k sampled and prompt, target
    prompt, prompt draws) within 1e-4."""
    assert [s.tokens for s in batched.sequences] == [s.tokens for s in alone.sequences]
    assert [s.stop_reason for s in batched.sequences] == [s.stop_reason for s in alone.sequences]
    for b, a in zip(batched.sequences, alone.sequences):
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4, rtol=0)
        _assert_same_topk(b.topk_logprobs, a.topk_logprobs)
    for name in ("target_prompt_logprobs", "prompt_alt_logprobs"):
        mine, theirs = getattr(batched, name), getattr(alone, name)
        assert (mine is None) == (theirs is None), name
        if theirs is not None:
            np.testing.assert_allclose(mine, theirs, atol=1e-4, rtol=0)
    assert (batched.prompt_alt_tokens is None) == (alone.prompt_alt_tokens is None)
    if alone.prompt_alt_tokens is not None:
        assert batched.prompt_alt_tokens.tolist() == alone.prompt_alt_tokens.tolist()
    assert (batched.prompt_logprobs is None) == (alone.prompt_logprobs is None)
    if alone.prompt_logprobs is not None:
        assert batched.prompt_logprobs[0] is None and len(batched.prompt_logprobs) == len(alone.prompt_logprobs)
        np.testing.assert_allclose(batched.prompt_logprobs[1:], alone.prompt_logprobs[1:], atol=1e-4, rtol=0)
    _assert_same_topk(batched.topk_prompt_logprobs, alone.topk_prompt_logprobs)


def peft_logits(settings: Settings, tokens: list[int], adapter_dir: str | None) -> torch.Tensor:
    """The reference: (N, V) logits of one plain HF (+ PEFT adapter) forward pass over tokens; row j predicts j + 1."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(Path(settings.models_dir) / TINY_MODEL_NAME), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([tokens])).logits[0]


def peft_prompt_logprobs(settings: Settings, tokens: list[int], adapter_dir: str) -> np.ndarray:
    """The reference: logprob of tokens[j] given tokens[:j] by one plain PEFT forward pass."""
    logits = peft_logits(settings, tokens, adapter_dir)
    return logits[:-1].log_softmax(-1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0].numpy()


def test_mixed_adapters_prompts_and_samples_each_equal_their_solo_run(sampler, settings, adapters):
    requests = []
    for seed, (adapter, prompt, n) in enumerate(
        (a, p, n) for a in [None, *adapters[:3]] for p in PROMPTS for n in (1, 3)
    ):
        if n == 1:
            requests.append(SampleRequest(TINY_MODEL_NAME, adapter, prompt, GREEDY, 1, True, 3))
        else:
            params = SamplingSpec(max_tokens=6, temperature=0.9, top_k=50, top_p=0.95, seed=seed, stop=[])
            requests.append(SampleRequest(TINY_MODEL_NAME, adapter, prompt, params, n))
    batched = sampler.sample_batch(requests)
    assert sampler.last_batch == {"requests": 24, "rows": 48, "loops": 1}
    for request, result in zip(requests, batched):
        assert_same(result, solo(sampler, request))
    # The adapters really took part, each its own: prompt logprobs equal plain PEFT's, and greedy outputs differ.
    for k, adapter in enumerate(adapters[:3]):
        result = batched[6 * (k + 1)]
        assert result.prompt_logprobs is not None
        np.testing.assert_allclose(
            result.prompt_logprobs[1:], peft_prompt_logprobs(settings, PROMPTS[0], adapter), atol=1e-4
        )
    greedy_outputs = {tuple(batched[6 * k].sequences[0].tokens) for k in range(4)}
    assert len(greedy_outputs) == 4


def test_seeded_sampling_does_not_depend_on_the_rest_of_the_batch(sampler, adapters):
    mine = SampleRequest(
        TINY_MODEL_NAME, adapters[0], PROMPTS[1], SamplingSpec(max_tokens=8, temperature=1.0, seed=7, stop=[]), 4
    )
    others = [
        SampleRequest(TINY_MODEL_NAME, a, p, SamplingSpec(max_tokens=3, seed=1, stop=[]), 2)
        for a in adapters[1:4]
        for p in PROMPTS
    ]
    first = sampler.sample_batch([mine])[0]
    second = sampler.sample_batch([*others[:5], mine, *others[5:]])[5]
    assert [s.tokens for s in first.sequences] == [s.tokens for s in second.sequences]
    assert len({tuple(s.tokens) for s in first.sequences}) > 1  # the 4 samples are not copies of one another


def test_rows_with_different_lengths_and_stops_finish_independently(sampler, adapters):
    long = solo(
        sampler,
        SampleRequest(TINY_MODEL_NAME, adapters[1], PROMPTS[0], SamplingSpec(max_tokens=12, temperature=0.0, stop=[])),
    )
    greedy = long.sequences[0].tokens
    stop_id = greedy[4]
    from backends.hf import get_base

    tokenizer = get_base(TINY_MODEL_NAME, sampler.settings, sampler.device).tokenizer
    stop_text = tokenizer.decode(greedy[2:4])
    specs = [
        SamplingSpec(max_tokens=12, temperature=0.0, stop=[]),
        SamplingSpec(max_tokens=2, temperature=0.0, stop=[]),
        SamplingSpec(max_tokens=7, temperature=0.0, stop=[]),
        SamplingSpec(max_tokens=12, temperature=0.0, stop=[stop_id]),
        SamplingSpec(max_tokens=12, temperature=0.0, stop=[stop_text]),
        SamplingSpec(max_tokens=0, temperature=0.0, stop=[]),
        SamplingSpec(max_tokens=5, temperature=1.0, seed=3, stop=[]),
    ]
    requests = [SampleRequest(TINY_MODEL_NAME, adapters[1], PROMPTS[0], spec) for spec in specs]
    requests.insert(
        3, SampleRequest(TINY_MODEL_NAME, None, PROMPTS[2], SamplingSpec(max_tokens=9, temperature=0.0, stop=[]), 2)
    )
    batched = sampler.sample_batch(requests)
    assert sampler.last_batch["loops"] == 1
    for request, result in zip(requests, batched):
        assert_same(result, solo(sampler, request))
    lengths = [len(r.sequences[0].tokens) for r in batched]
    assert lengths[:3] == [12, 2, 7] and lengths[6] == 0 and lengths[7] == 5
    assert batched[0].sequences[0].tokens == greedy and batched[1].sequences[0].tokens == greedy[:2]
    by_id = batched[4].sequences[0]
    assert by_id.stop_reason == "stop" and by_id.tokens == greedy[: greedy.index(stop_id) + 1]
    by_text = batched[5].sequences[0]
    assert by_text.stop_reason == "stop" and stop_text in tokenizer.decode(by_text.tokens) and len(by_text.tokens) <= 4
    assert batched[0].sequences[0].stop_reason == "length" and batched[6].sequences[0].stop_reason == "length"


def test_a_bad_request_fails_alone(sampler, adapters, tmp_path):
    good = [SampleRequest(TINY_MODEL_NAME, a, p, GREEDY, 1, True) for a, p in zip([None, adapters[2]], PROMPTS)]
    bad = [
        SampleRequest(TINY_MODEL_NAME, adapters[0], [1, VOCAB, 3], GREEDY),
        SampleRequest(TINY_MODEL_NAME, str(tmp_path / "missing"), PROMPTS[0], GREEDY),
        SampleRequest(TINY_MODEL_NAME, None, PROMPTS[0], dataclasses.replace(GREEDY, top_p=0.0)),
        SampleRequest("nobody/nothing", None, PROMPTS[0], GREEDY),
        SampleRequest(TINY_MODEL_NAME, None, PROMPTS[0], GREEDY, num_samples=0),
    ]
    results = sampler.sample_batch([bad[0], good[0], bad[1], bad[2], good[1], bad[3], bad[4]])
    assert sampler.last_batch == {"requests": 7, "rows": 2, "loops": 1}
    for result, field in zip(
        [results[0], results[2], results[3], results[5], results[6]],
        ["prompt", "model_path", "top_p", "base_model", "num_samples"],
    ):
        assert isinstance(result, UserError) and field in str(result)
    assert_same(results[1], solo(sampler, good[0]))
    assert_same(results[4], solo(sampler, good[1]))
    with pytest.raises(UserError, match="outside the vocabulary"):
        solo(sampler, bad[0])


def test_many_requests_share_few_loops_capped_by_engine_sample_rows(settings, adapters):
    from backends.hf_sample import HFSamplingBackend

    requests = [
        SampleRequest(
            TINY_MODEL_NAME, adapters[i % 8], PROMPTS[i % 3], SamplingSpec(max_tokens=4, temperature=0.0, stop=[])
        )
        for i in range(64)
    ]
    wide = HFSamplingBackend(settings)
    results = wide.sample_batch(requests)
    assert wide.last_batch == {"requests": 64, "rows": 64, "loops": 1}
    narrow = HFSamplingBackend(dataclasses.replace(settings, engine_sample_rows=16))
    capped = narrow.sample_batch(requests)
    assert narrow.last_batch == {"requests": 64, "rows": 64, "loops": 4}
    for i in range(0, 64, 7):
        assert_same(results[i], capped[i])
        assert_same(results[i], solo(narrow, requests[i]))
    # A request with more samples than the cap gets a loop of its own.
    big = SampleRequest(
        TINY_MODEL_NAME, adapters[0], PROMPTS[0], SamplingSpec(max_tokens=2, seed=1, stop=[]), num_samples=20
    )
    narrow.sample_batch([requests[0], big, requests[1]])
    assert narrow.last_batch == {"requests": 3, "rows": 22, "loops": 3}


def test_requests_for_different_base_models_are_decoded_per_model(sampler):
    requests = [
        SampleRequest(model, None, prompt, GREEDY, 1, True)
        for prompt in PROMPTS
        for model in (TINY_MODEL_NAME, OTHER_MODEL)
    ]
    results = sampler.sample_batch(requests)
    assert sampler.last_batch == {"requests": 6, "rows": 6, "loops": 2}
    for request, result in zip(requests, results):
        assert_same(result, solo(sampler, request))
    for k in range(0, 6, 2):  # same weights under two names: same numbers
        assert_same(results[k], results[k + 1])


def test_a_request_past_the_sample_time_limit_fails_alone_with_the_setting_named(settings, adapters):
    """A request still decoding past TINKERBELL_SAMPLE_TIME_LIMIT_S leaves the loop with an error; one that finished
    within it (here: its only token is the first step) keeps its tokens, equal to its run without a limit."""
    from backends.hf_sample import HFSamplingBackend

    short = SampleRequest(
        TINY_MODEL_NAME, adapters[1], PROMPTS[0], SamplingSpec(max_tokens=1, temperature=0.0, stop=[])
    )
    long = SampleRequest(
        TINY_MODEL_NAME, adapters[2], PROMPTS[1], SamplingSpec(max_tokens=64, temperature=0.0, stop=[])
    )
    limited = HFSamplingBackend(dataclasses.replace(settings, sample_time_limit_s=1e-9))
    results = limited.sample_batch([long, short])
    assert isinstance(results[0], UserError) and "TINKERBELL_SAMPLE_TIME_LIMIT_S" in str(results[0])
    unlimited = HFSamplingBackend(settings)
    assert_same(results[1], solo(unlimited, short))
    assert len(solo(unlimited, long).sequences[0].tokens) == 64  # without the limit it runs to max_tokens


# ---- sampling extras: topk_sample_logprobs, target_prompt_logprobs, prompt_alt_tokens_k -----------------------------
def dense_cells(ids: list[list[int]]) -> np.ndarray:
    """A dense [len(prompt) - 1, K] target_prompt_logprobs as the (n, 2) [row, token id] cells a backend takes."""
    ids_array = np.asarray(ids, dtype=np.int64)
    rows = np.repeat(np.arange(ids_array.shape[0]), ids_array.shape[1])
    return np.stack([rows, ids_array.reshape(-1)], axis=1)


def check_against_peft(settings: Settings, request: SampleRequest, result: SampleResult) -> None:
    """Every extra the request asked for equals plain PEFT's full forward over prompt + completion."""
    prompt = request.prompt
    prompt_lsm = peft_logits(settings, prompt, request.adapter_dir)[:-1].log_softmax(-1)  # (L-1, V)
    for seq in result.sequences:
        if not request.topk_sample_logprobs:
            assert seq.topk_logprobs is None
            continue
        full = prompt + seq.tokens
        lsm = peft_logits(settings, full, request.adapter_dir)[len(prompt) - 1 : len(full) - 1].log_softmax(-1)
        np.testing.assert_allclose(seq.logprobs, lsm.gather(-1, torch.tensor(seq.tokens)[:, None])[:, 0], atol=1e-4)
        values, ids = lsm.topk(request.topk_sample_logprobs, dim=-1)  # (T, k)
        assert len(seq.topk_logprobs) == len(seq.tokens)
        assert [[t for t, _ in row] for row in seq.topk_logprobs] == ids.tolist()
        got = np.reshape([[v for _, v in row] for row in seq.topk_logprobs], tuple(values.shape))
        np.testing.assert_allclose(got, values, atol=1e-4)
    if request.target_prompt_cells is None:
        assert result.target_prompt_logprobs is None
    else:
        cells = torch.as_tensor(request.target_prompt_cells)
        expected = prompt_lsm[cells[:, 0], cells[:, 1].clamp(min=0)].masked_fill(cells[:, 1] < 0, 0.0)
        np.testing.assert_allclose(result.target_prompt_logprobs, expected, atol=1e-4)
        assert (result.target_prompt_logprobs[cells[:, 1].numpy() < 0] == 0).all()
    if not request.prompt_alt_tokens_k:
        assert result.prompt_alt_tokens is None and result.prompt_alt_logprobs is None
    else:
        draws = torch.as_tensor(result.prompt_alt_tokens)
        assert tuple(draws.shape) == (len(prompt) - 1, request.prompt_alt_tokens_k)
        np.testing.assert_allclose(result.prompt_alt_logprobs, prompt_lsm.gather(-1, draws), atol=1e-4)
        if request.params.temperature == 0:
            assert (draws == prompt_lsm.argmax(-1, keepdim=True)).all()


def test_sampling_extras_in_a_mixed_batch_equal_plain_peft_and_their_solo_run(sampler, settings, adapters):
    seeded = SamplingSpec(max_tokens=5, temperature=0.9, top_k=50, seed=11, stop=[])
    target = [[436, 2036], [5, -1], [-1, -1], [3158, 9000], [7, 8], [1, 2], [3, 4], [260, 4649], [-1, 47]]
    requests = [
        SampleRequest(TINY_MODEL_NAME, adapters[0], PROMPTS[0], seeded, 3, False, 0, 4, dense_cells(target), 3),
        SampleRequest(
            TINY_MODEL_NAME, adapters[1], PROMPTS[1], GREEDY, 1, True, 3, 2, dense_cells([[88, -1], [4123, 1]]), 2
        ),
        SampleRequest(TINY_MODEL_NAME, None, PROMPTS[2], dataclasses.replace(seeded, seed=2), 2),  # no extras
        SampleRequest(
            TINY_MODEL_NAME, adapters[2], PROMPTS[0], dataclasses.replace(GREEDY, max_tokens=0), 1, False, 0, 3
        ),
        SampleRequest(TINY_MODEL_NAME, None, PROMPTS[2], dataclasses.replace(seeded, seed=3), 2, False, 0, 5, None, 6),
        SampleRequest(TINY_MODEL_NAME, adapters[0], PROMPTS[1], GREEDY, 2),  # no extras, another adapter's rows
    ]
    batched = sampler.sample_batch(requests)
    assert sampler.last_batch == {"requests": 6, "rows": 11, "loops": 1}
    for request, result in zip(requests, batched):
        assert_same(result, solo(sampler, request))
        check_against_peft(settings, request, result)
    assert batched[3].sequences[0].topk_logprobs == []  # max_tokens 0: no sampled positions
    # Asking for extras changes no sampled token: the same seeded request without them draws the same.
    plain = solo(sampler, dataclasses.replace(requests[0], topk_sample_logprobs=0, target_prompt_cells=None))
    assert [s.tokens for s in plain.sequences] == [s.tokens for s in batched[0].sequences]
    plain = solo(sampler, dataclasses.replace(requests[0], prompt_alt_tokens_k=0))
    assert [s.tokens for s in plain.sequences] == [s.tokens for s in batched[0].sequences]


def test_prompt_alt_tokens_are_drawn_from_the_distribution_at_the_requests_temperature(sampler, settings, adapters):
    k, temperature = 4096, 0.7
    request = SampleRequest(
        TINY_MODEL_NAME,
        adapters[3],
        PROMPTS[0],
        SamplingSpec(max_tokens=1, temperature=temperature, seed=5, stop=[]),
        prompt_alt_tokens_k=k,
    )
    result = solo(sampler, request)
    probs = (peft_logits(settings, PROMPTS[0], adapters[3])[:-1] / temperature).softmax(-1)  # (L-1, V)
    draws = torch.as_tensor(result.prompt_alt_tokens)  # (L-1, k)
    for i in range(len(PROMPTS[0]) - 1):
        for token in probs[i].topk(3).indices.tolist():
            frequency = float((draws[i] == token).float().mean())  # binomial std <= 0.008 for 4096 draws
            assert abs(frequency - float(probs[i, token])) < 0.04, (i, token, frequency, float(probs[i, token]))
    assert solo(sampler, request).prompt_alt_tokens.tolist() == draws.tolist()  # the seed fixes the draws
    other = solo(sampler, dataclasses.replace(request, params=dataclasses.replace(request.params, seed=6)))
    assert other.prompt_alt_tokens.tolist() != draws.tolist()


def test_bad_sampling_extras_fail_alone_naming_the_field(sampler, adapters):
    good = SampleRequest(TINY_MODEL_NAME, adapters[0], PROMPTS[1], GREEDY, 1, False, 0, 2, dense_cells([[5], [6]]), 1)
    bad = [
        dataclasses.replace(good, target_prompt_cells=dense_cells([[5], [6], [7]])),  # 3 rows for a 3-token prompt
        dataclasses.replace(good, target_prompt_cells=dense_cells([[VOCAB], [6]])),
        dataclasses.replace(good, target_prompt_cells=dense_cells([[-1], [-1]])),
        dataclasses.replace(good, topk_sample_logprobs=VOCAB + 1),
        dataclasses.replace(good, prompt_alt_tokens_k=-1),
    ]
    results = sampler.sample_batch([bad[0], good, *bad[1:]])
    messages = ["len(prompt) - 1 = 2 rows", "outside the vocabulary", "names no token id", "topk_sample_logprobs", "-1"]
    for result, message in zip([results[0], *results[2:]], messages):
        assert isinstance(result, UserError) and message in str(result), result
    assert "target_prompt_logprobs" in str(results[0]) and "prompt_alt_tokens_k" in str(results[-1])
    assert_same(results[1], solo(sampler, good))
