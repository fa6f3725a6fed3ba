"""Our multi-LoRA layer and the packed forward_backward: mixed adapters in one pass equal each alone and plain PEFT."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from backends.base import AdamSpec, Datum, FwdBwdRequest, FwdBwdResult, LoraSpec
from core.errors import UserError
from core.settings import Settings
from tests.test_backend_hf import VOCAB, backend_params, make_data, new_id, ref_logprobs
from tests.tiny_model import TINY_MODEL_NAME, build_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def assert_grad_close(got: torch.Tensor, want: torch.Tensor, key: str) -> None:
    """Gradients summed over a pass in float32 agree to ~1e-6 of the tensor's scale, not elementwise: batched and
    alone run GEMMs of other shapes, which the CPU's BLAS blocks (and so rounds) differently. Seen on an AMD EPYC:
    differences up to 5.9e-5 on lora_A gradients whose largest element is 5.4 (1.1e-5 of it)."""
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, atol=2e-5 * scale + 1e-7, rtol=0, msg=key)


ADAM = AdamSpec(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-5, weight_decay=0.01)  # eps: test_backend_hf REF_ATOL
# Different ranks, alphas and target sets, cycled over the adapters of one pass.
CONFIGS = [
    {"rank": 4, "alpha": 8.0},
    {"rank": 2, "alpha": 4.0, "train_mlp": False, "train_unembed": False},
    {"rank": 8, "alpha": 32.0, "train_attn": False},
]
BUILTIN_LOSSES = ["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo"]


def custom_weighted_square(model_outputs, loss_fn_inputs, attention_mask, **config):
    """A custom-contract loss: sum of squared (masked) logprobs."""
    lp = model_outputs["logprobs"]  # (B, T)
    return (lp.square() * attention_mask).sum() * 1e-2, {"tokens:sum": float(attention_mask.sum())}


def custom_raises(model_outputs, loss_fn_inputs, attention_mask, **config):
    raise RuntimeError("boom from a user loss")


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    models = tmp_path_factory.mktemp("ml-models")
    build_tiny_model(models / "tinkerbell" / "tiny-llama")
    return Settings(models_dir=str(models), data_dir=str(tmp_path_factory.mktemp("ml-data")), device="cpu")


@pytest.fixture(scope="module")
def tb(settings):
    from backends.hf_train import HFTrainingBackend

    return HFTrainingBackend(settings)


@pytest.fixture(scope="module", autouse=True)
def custom_losses():
    from losses import register_loss, unregister_loss
    from tasks.custom_losses import guarded

    register_loss("test_ml_square", guarded(custom_weighted_square, "test_ml_square", 10.0), custom=True, replace=True)
    register_loss("test_ml_raises", guarded(custom_raises, "test_ml_raises", 10.0), custom=True, replace=True)
    yield
    unregister_loss("test_ml_square")
    unregister_loss("test_ml_raises")


def adapter(tb, i: int, seed: int) -> str:
    """An adapter with CONFIGS[i % 3] and non-zero LoRA B (seeded), so every adapter path changes the logits."""
    model_id = new_id()
    tb.create_adapter(model_id, TINY_MODEL_NAME, LoraSpec(seed=seed, **CONFIGS[i % len(CONFIGS)]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in tb._get(model_id).params.items():
            if "lora_B" in key:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model_id


def rl_data(tb, model_id: str, seed: int, lengths=(5, 9, 3)) -> list[Datum]:
    """Datums for every built-in loss: sampler logprobs near the model's own (so ratios stay finite), advantages."""
    data = make_data(seed, lengths)
    [probe] = tb.forward_backward([FwdBwdRequest(model_id, data, forward_only=True)])
    rng = np.random.default_rng(seed)
    for d, out in zip(data, probe.loss_fn_outputs):
        n = len(d.tokens)
        d.loss_fn_inputs["logprobs"] = (out["logprobs"] + rng.normal(0, 0.1, n)).astype(np.float32)
        d.loss_fn_inputs["advantages"] = rng.normal(0, 1, n).astype(np.float32)
    return data


def grads(tb, model_id: str) -> dict[str, torch.Tensor | None]:
    return {k: None if p.grad is None else p.grad.clone() for k, p in tb._get(model_id).params.items()}


def assert_same_result(a: FwdBwdResult, b: FwdBwdResult) -> None:
    assert isinstance(a, FwdBwdResult) and isinstance(b, FwdBwdResult)
    for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(x["logprobs"], y["logprobs"], atol=1e-5, rtol=0)
    assert a.metrics.keys() == b.metrics.keys()
    for key in a.metrics:
        assert a.metrics[key] == pytest.approx(b.metrics[key], abs=1e-5, rel=1e-5), key  # sums: see assert_grad_close


def test_mixed_adapters_and_losses_in_one_pass_equal_each_alone(tb, tmp_path):
    """Seven adapters (three rank/alpha/target configs), each with another loss (every built-in and a custom one),
    in one pass: results, gradients and weights after optim_step equal each adapter run alone."""
    losses = [*BUILTIN_LOSSES, "test_ml_square"]
    alone = [adapter(tb, i, seed=100 + i) for i in range(len(losses))]
    batched = [adapter(tb, i, seed=100 + i) for i in range(len(losses))]
    data = [rl_data(tb, m, seed=200 + i, lengths=(3 + i, 11 - i, 6)) for i, m in enumerate(alone)]
    solo = [tb.forward_backward([FwdBwdRequest(m, d, loss_fn=fn)])[0] for m, d, fn in zip(alone, data, losses)]
    together = tb.forward_backward([FwdBwdRequest(m, d, loss_fn=fn) for m, d, fn in zip(batched, data, losses)])
    assert tb.last_pass["adapters"] == len(losses) and tb.last_pass["requests"] == len(losses)
    for a, b, m_alone, m_batched in zip(solo, together, alone, batched):
        assert_same_result(a, b)
        ga, gb = grads(tb, m_alone), grads(tb, m_batched)
        for key in ga:
            assert ga[key] is not None and gb[key] is not None, key
            assert_grad_close(gb[key], ga[key], key)
    for a, b in zip(alone, batched):
        tb.optim_step(a, ADAM)
        tb.optim_step(b, ADAM)
        pa, pb = backend_params(tb, a, tmp_path), backend_params(tb, b, tmp_path)
        for key in pa:
            torch.testing.assert_close(pb[key], pa[key], atol=2e-5, rtol=0, msg=key)  # Adam: see test_backend_hf
    for m in alone + batched:
        tb.remove_adapter(m)


def test_mixed_pass_equals_plain_peft(tb, settings, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = [adapter(tb, i, seed=300 + i) for i in range(len(CONFIGS))]
    data = [make_data(310 + i, (4 + i, 8, 2), k=2 if i == 1 else None) for i in range(len(ids))]
    results = tb.forward_backward([FwdBwdRequest(m, d, forward_only=True) for m, d in zip(ids, data)])
    for i, (model_id, result) in enumerate(zip(ids, results)):
        tb.save_state(model_id, str(tmp_path / f"a{i}"), False)
        base = AutoModelForCausalLM.from_pretrained(
            str(Path(settings.models_dir) / TINY_MODEL_NAME), dtype=torch.float32
        )
        peft_model = PeftModel.from_pretrained(base, str(tmp_path / f"a{i}")).eval()
        with torch.no_grad():
            expected = ref_logprobs(peft_model, data[i])
        for out, exp in zip(result.loss_fn_outputs, expected):
            np.testing.assert_allclose(out["logprobs"], exp.numpy(), atol=1e-5, rtol=0)
    for m in ids:
        tb.remove_adapter(m)


def test_gradients_land_only_on_own_params(tb):
    a, b, c = (adapter(tb, i, seed=400 + i) for i in range(3))
    base = tb._get(a).base
    assert base.model.lm_head.weight is base.model.get_input_embeddings().weight  # tied, as in SmolLM2
    tb.forward_backward(
        [
            FwdBwdRequest(a, make_data(401)),
            FwdBwdRequest(b, make_data(402), forward_only=True),
            FwdBwdRequest(c, make_data(403)),
        ]
    )
    assert all(p.grad is not None for p in tb.trainable_parameters(a) + tb.trainable_parameters(c))
    assert all(p.grad is None for p in tb.trainable_parameters(b))  # forward only: nothing accumulated
    assert all(p.grad is None for p in base.model.parameters())  # the base stays frozen
    from tasks.custom_losses import trainable_parameters

    assert trainable_parameters(tb, a) == tb.trainable_parameters(a)
    for m in (a, b, c):
        tb.remove_adapter(m)


def test_poisoned_requests_fail_alone(tb):
    """Bad token id, NaN weights, a custom loss that raises: each fails in its slot, the others are as if alone."""
    good1, bad_id, nan_w, raises, good2 = (adapter(tb, i, seed=500 + i) for i in range(5))
    d_good1, d_good2 = make_data(501), make_data(502, (7, 2))
    d_bad = make_data(503)
    d_bad[1].tokens[0] = VOCAB
    d_nan = make_data(504)
    d_nan[2].loss_fn_inputs["weights"][1] = np.nan
    expected1 = tb.forward_backward([FwdBwdRequest(good1, d_good1)])[0]
    expected2 = tb.forward_backward([FwdBwdRequest(good2, d_good2)])[0]
    grads1, grads2 = grads(tb, good1), grads(tb, good2)
    for m in (good1, good2):
        tb.discard_gradients(m)
    results = tb.forward_backward(
        [
            FwdBwdRequest(good1, d_good1),
            FwdBwdRequest(bad_id, d_bad),
            FwdBwdRequest(nan_w, d_nan),
            FwdBwdRequest(raises, make_data(505), loss_fn="test_ml_raises"),
            FwdBwdRequest(good2, d_good2),
        ]
    )
    assert isinstance(results[1], UserError) and "data[1].model_input" in str(results[1])
    assert isinstance(results[2], UserError) and "nan" in str(results[2])
    assert isinstance(results[3], UserError) and "boom from a user loss" in str(results[3])
    assert tb.last_pass["requests"] == 4  # the bad token id never reached the pass
    assert_same_result(results[0], expected1)
    assert_same_result(results[4], expected2)
    for model_id, expected in ((good1, grads1), (good2, grads2)):
        for key, grad in grads(tb, model_id).items():
            assert grad is not None, key
            assert_grad_close(grad, expected[key], key)
    for model_id in (bad_id, nan_w, raises):
        assert all(p.grad is None for p in tb.trainable_parameters(model_id))
    for m in (good1, bad_id, nan_w, raises, good2):
        tb.remove_adapter(m)


def test_padding_fraction_of_eight_datums_16_to_512(tb):
    from backends.multilora import pack_rows

    lengths = [int(n) for n in np.linspace(16, 512, 8)]
    rows, width = pack_rows(lengths)
    assert sorted(k for row in rows for k in row) == list(range(8)) and width >= 512
    assert all(sum(lengths[k] for k in row) <= width for row in rows)
    a, b = adapter(tb, 0, seed=600), adapter(tb, 1, seed=601)
    data = make_data(602, lengths)
    tb.forward_backward(
        [FwdBwdRequest(a, data[::2], forward_only=True), FwdBwdRequest(b, data[1::2], forward_only=True)]
    )
    stats = tb.last_pass
    assert stats["tokens"] == sum(lengths) and stats["positions"] == len(rows) * width
    assert stats["padding_fraction"] <= 0.10 and stats["adapters"] == 2 and stats["requests"] == 2
    for m in (a, b):
        tb.remove_adapter(m)


def test_packed_datums_do_not_attend_to_each_other(tb, settings):
    """Three datums share one packed row; changing one leaves the others' logprobs unchanged, and each equals a
    plain unpacked forward of it alone (so transformers' packed-sequence mask really isolates them)."""
    from transformers import AutoModelForCausalLM

    model_id = new_id()
    tb.create_adapter(model_id, TINY_MODEL_NAME, LoraSpec(rank=4, seed=700))
    data = make_data(701, (20, 7, 5))
    [first] = tb.forward_backward([FwdBwdRequest(model_id, data, forward_only=True)])
    assert tb.last_pass["positions"] == 32  # one row, no padding
    data[0].tokens = np.random.default_rng(702).integers(0, VOCAB, 20)
    [second] = tb.forward_backward([FwdBwdRequest(model_id, data, forward_only=True)])
    assert not np.allclose(first.loss_fn_outputs[0]["logprobs"], second.loss_fn_outputs[0]["logprobs"])
    for i in (1, 2):
        np.testing.assert_allclose(
            first.loss_fn_outputs[i]["logprobs"], second.loss_fn_outputs[i]["logprobs"], atol=1e-6, rtol=0
        )
    plain = AutoModelForCausalLM.from_pretrained(
        str(Path(settings.models_dir) / TINY_MODEL_NAME), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        expected = ref_logprobs(plain, data)  # B = 0 at init: the adapter is the identity
    for out, exp in zip(second.loss_fn_outputs, expected):
        np.testing.assert_allclose(out["logprobs"], exp.numpy(), atol=1e-5, rtol=0)
    tb.remove_adapter(model_id)


def test_routed_rows_unsorted_equal_each_alone(tb):
    """The sampling API: routed(rows) with rows in any order, None = the base model."""
    a, b = adapter(tb, 0, seed=800), adapter(tb, 1, seed=801)
    base = tb._get(a).base
    names = [tb._get(a).name, None, tb._get(b).name, tb._get(a).name]
    ids = torch.from_numpy(np.random.default_rng(802).integers(0, VOCAB, (4, 6)))  # (4, 6)
    with torch.no_grad(), base.lock:
        with base.routed(names):
            logits, _ = base.decode_step(ids)  # (4, 6, V)
        for row, name in enumerate(names):
            with base.routed([name]):
                alone, _ = base.decode_step(ids[row : row + 1])
            torch.testing.assert_close(logits[row], alone[0], atol=1e-5, rtol=0)
        with pytest.raises(KeyError), base.routed(["nobody"]):
            pass
    for m in (a, b):
        tb.remove_adapter(m)


def test_bfloat16_base_keeps_lora_and_optimizer_in_float32(settings):
    from backends.hf_train import HFTrainingBackend

    bf16 = HFTrainingBackend(
        Settings(models_dir=settings.models_dir, data_dir=settings.data_dir, device="cpu", dtype="bfloat16")
    )
    assert bf16.dtype == torch.bfloat16
    model_id = new_id()
    bf16.create_adapter(model_id, TINY_MODEL_NAME, LoraSpec(rank=4, seed=900))
    assert next(bf16._get(model_id).base.model.parameters()).dtype == torch.bfloat16
    [result] = bf16.forward_backward([FwdBwdRequest(model_id, make_data(901))])
    assert np.isfinite(result.metrics["loss:sum"])
    params = bf16.trainable_parameters(model_id)
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    bf16.optim_step(model_id, ADAM)
    state = bf16._get(model_id).optimizer.state
    assert all(s["exp_avg"].dtype == torch.float32 for s in state.values())
    bf16.remove_adapter(model_id)
