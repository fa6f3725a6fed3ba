"""HF backends (our multi-LoRA layer) against plain PEFT / torch references on the tiny Llama (fast), plus one
SmolLM2 test (marked)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from backends.base import AdamSpec, Datum, FwdBwdRequest, LoraSpec, SamplingSpec
from core.errors import NotFound, UserError
from core.settings import Settings
from tests.tiny_model import TINY_MODEL_NAME, build_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is first imported (by transformers, later)
VOCAB = 49152
_ids = iter(range(10**6))


def new_id() -> str:
    return f"sess{next(_ids)}:train:0"


@pytest.fixture(scope="session")
def hf_settings(tmp_path_factory) -> Settings:
    models = tmp_path_factory.mktemp("hf-models")
    build_tiny_model(models / "tinkerbell" / "tiny-llama")
    return Settings(models_dir=str(models), data_dir=str(tmp_path_factory.mktemp("hf-data")), device="cpu")


@pytest.fixture(scope="session")
def trainer(hf_settings):
    from backends.hf import HFTrainingBackend

    return HFTrainingBackend(hf_settings)


@pytest.fixture(scope="session")
def sampler(hf_settings):
    from backends.hf import HFSamplingBackend

    return HFSamplingBackend(hf_settings)


def make_data(seed: int, lengths=(5, 9, 3), k: int | None = None) -> list[Datum]:
    rng = np.random.default_rng(seed)
    data = []
    for n in lengths:
        target = rng.integers(0, VOCAB, (n, k) if k else n)
        weights = rng.random(n).astype(np.float32)
        data.append(
            Datum(tokens=rng.integers(0, VOCAB, n), loss_fn_inputs={"target_tokens": target, "weights": weights})
        )
    return data


def plain_peft(settings: Settings, lora: LoraSpec):
    """The reference: a fresh base model + get_peft_model, seeded like the backend."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from backends.hf import lora_targets

    base = AutoModelForCausalLM.from_pretrained(
        str(Path(settings.models_dir) / TINY_MODEL_NAME), dtype=torch.float32
    ).eval()
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=lora_targets(lora.train_attn, lora.train_mlp, lora.train_unembed),
        lora_dropout=0.0,
    )
    torch.manual_seed(lora.seed)
    return get_peft_model(base, config).eval()


def ref_params(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}


def ref_logprobs(model, data: list[Datum]) -> list[torch.Tensor]:
    out = []
    for d in data:
        logits = model(input_ids=torch.tensor(d.tokens)[None]).logits[0]  # (N, V)
        target = torch.tensor(d.loss_fn_inputs["target_tokens"])
        out.append(logits.log_softmax(-1).gather(-1, target.reshape(len(target), -1)).reshape(target.shape))
    return out


def ref_loss(logprobs: list[torch.Tensor], data: list[Datum]) -> torch.Tensor:
    total = torch.zeros(())
    for lp, d in zip(logprobs, data):
        w = torch.tensor(d.loss_fn_inputs["weights"])
        total = total - (lp * (w if lp.dim() == 1 else w[:, None])).sum()
    return total


def ref_logprobs_batched(model, data: list[Datum]) -> list[torch.Tensor]:
    """Same numbers as ref_logprobs, computed like the backend (one right-padded batch) so gradients match bit for bit.

    Adam's first step is ~lr*sign(g): float32 noise from another batch layout would show up at 1e-5, not 1e-6.
    """
    lengths = [len(d.tokens) for d in data]
    ids = torch.zeros((len(data), max(lengths)), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, d in enumerate(data):
        ids[i, : lengths[i]], mask[i, : lengths[i]] = torch.as_tensor(d.tokens), 1
    logits = model(input_ids=ids, attention_mask=None if min(lengths) == max(lengths) else mask).logits
    out = []
    for i, d in enumerate(data):
        row, target = logits[i, : lengths[i]], torch.as_tensor(d.loss_fn_inputs["target_tokens"])
        lp = torch.log_softmax(row, -1).gather(-1, target.reshape(lengths[i], -1))
        out.append(lp.reshape(target.shape))
    return out


def ref_train(settings: Settings, lora: LoraSpec, schedule: list) -> dict[str, torch.Tensor]:
    """Run ("fb", data) / ("step", AdamSpec) on plain PEFT + torch AdamW (+ clip_grad_norm_)."""
    model = plain_peft(settings, lora)
    params = [p for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)]
    opt = torch.optim.AdamW(params)
    for kind, arg in schedule:
        if kind == "fb":
            ref_loss(ref_logprobs_batched(model, arg), arg).backward()
        else:
            if arg.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, arg.grad_clip_norm)
            for g in opt.param_groups:
                g.update(lr=arg.learning_rate, betas=(arg.beta1, arg.beta2), eps=arg.eps, weight_decay=arg.weight_decay)
            opt.step()
            opt.zero_grad()
    return ref_params(model)


def backend_params(trainer, model_id: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    directory = tmp_path / f"params-{model_id.replace(':', '_')}"
    trainer.save_state(model_id, str(directory), False)
    return load_file(str(directory / "adapter_model.safetensors"))


def assert_params_close(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], atol=atol, rtol=0, msg=key)


# Against the PEFT + torch.optim.AdamW reference (an independent computation, other summation orders) weights after
# a step agree to REF_ATOL, not 1e-6: Adam divides each gradient by its own size, so float noise on elements whose
# gradient is near zero (unembedding rows of unused tokens; lora_A, whose gradient is 0 while B is 0) becomes a
# visible update. On an AMD EPYC the largest differences were 9e-6 (eps=1e-8) and 4.5e-6 (eps=1e-5). Our own paths
# against each other (batched vs alone, tests/test_multilora.py, tests/test_engine.py) are held to 1e-6.
REF_ATOL = 2e-5
ADAM = AdamSpec(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-5, weight_decay=0.01, grad_clip_norm=0.0)


# ---- training -----------------------------------------------------------------------------------------------------
def test_same_seed_same_init_and_matches_peft(trainer, hf_settings, tmp_path):
    lora = LoraSpec(rank=4, alpha=8.0, seed=7)
    a, b = new_id(), new_id()
    trainer.create_adapter(a, TINY_MODEL_NAME, lora)
    trainer.create_adapter(b, TINY_MODEL_NAME, lora)
    pa, pb = backend_params(trainer, a, tmp_path), backend_params(trainer, b, tmp_path)
    assert_params_close(pa, pb, 0)
    assert_params_close(pa, ref_params(plain_peft(hf_settings, lora)), 0)
    c = new_id()
    trainer.create_adapter(c, TINY_MODEL_NAME, LoraSpec(rank=4, alpha=8.0, seed=8))
    assert not torch.equal(
        backend_params(trainer, c, tmp_path)["base_model.model.lm_head.lora_A.weight"],
        pa["base_model.model.lm_head.lora_A.weight"],
    )
    for m in (a, b, c):
        trainer.remove_adapter(m)


def test_logprobs_and_loss_match_peft(trainer, hf_settings, tmp_path):
    """Padded batch (different lengths, 1-D and 2-D targets) == per-datum plain PEFT, with a non-zero LoRA."""
    lora = LoraSpec(rank=4, alpha=16.0, seed=1)
    ref = plain_peft(hf_settings, lora)
    with torch.no_grad():  # make LoRA B non-zero so the adapter path matters
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    ref.save_pretrained(str(tmp_path / "ref"))
    model_id = new_id()
    trainer.create_adapter(model_id, TINY_MODEL_NAME, lora)
    trainer.load_state(model_id, str(tmp_path / "ref"), with_optimizer=False)
    wire_like = make_data(1, (4, 7), k=3)  # 2-D targets; read-only arrays, as decoded from message bytes
    for d in wire_like:
        for arr in (d.tokens, *d.loss_fn_inputs.values()):
            arr.flags.writeable = False
    for data in (make_data(0, (5, 9, 3)), wire_like):
        [result] = trainer.forward_backward([FwdBwdRequest(model_id, data, forward_only=True)])
        with torch.no_grad():
            expected = ref_logprobs(ref, data)
        for out, exp, d in zip(result.loss_fn_outputs, expected, data):
            assert (
                out["logprobs"].dtype == np.float32 and out["logprobs"].shape == d.loss_fn_inputs["target_tokens"].shape
            )
            np.testing.assert_allclose(out["logprobs"], exp.numpy(), atol=1e-5, rtol=0)
        assert result.metrics["loss:sum"] == pytest.approx(float(ref_loss(expected, data)), abs=1e-4)
        assert all(key.count(":") == 1 for key in result.metrics)
    trainer.remove_adapter(model_id)


def test_optim_step_matches_torch_adamw(trainer, hf_settings, tmp_path):
    lora = LoraSpec(rank=4, alpha=8.0, seed=3)
    clipped = AdamSpec(learning_rate=5e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, grad_clip_norm=1.0)
    schedule = [("fb", make_data(2)), ("step", ADAM), ("fb", make_data(3, (6, 2))), ("step", clipped)]
    model_id = new_id()
    trainer.create_adapter(model_id, TINY_MODEL_NAME, lora)
    for kind, arg in schedule:
        if kind == "fb":
            trainer.forward_backward([FwdBwdRequest(model_id, arg)])
        else:
            metrics = trainer.optim_step(model_id, arg)
            assert metrics["grad_norm:mean"] > 0 and all(k.count(":") == 1 for k in metrics)
    assert_params_close(
        backend_params(trainer, model_id, tmp_path), ref_train(hf_settings, lora, schedule), atol=REF_ATOL
    )
    trainer.remove_adapter(model_id)


def test_two_adapters_interleaved_equal_alone(trainer, hf_settings, tmp_path):
    la, lb = LoraSpec(rank=4, alpha=8.0, seed=11), LoraSpec(rank=2, alpha=4.0, seed=12, train_mlp=False)
    da, db = [make_data(20), make_data(21, (3, 3))], [make_data(22, (8,)), make_data(23)]
    a, b = new_id(), new_id()
    trainer.create_adapter(a, TINY_MODEL_NAME, la)
    trainer.create_adapter(b, TINY_MODEL_NAME, lb)
    trainer.forward_backward([FwdBwdRequest(a, da[0])])
    trainer.forward_backward([FwdBwdRequest(b, db[0])])
    trainer.optim_step(b, ADAM)
    trainer.optim_step(a, ADAM)
    trainer.forward_backward([FwdBwdRequest(b, db[1]), FwdBwdRequest(a, da[1])])  # one call, two adapters
    trainer.optim_step(a, ADAM)
    trainer.optim_step(b, ADAM)
    expected_a = ref_train(hf_settings, la, [("fb", da[0]), ("step", ADAM), ("fb", da[1]), ("step", ADAM)])
    expected_b = ref_train(hf_settings, lb, [("fb", db[0]), ("step", ADAM), ("fb", db[1]), ("step", ADAM)])
    assert_params_close(backend_params(trainer, a, tmp_path), expected_a, atol=REF_ATOL)
    assert_params_close(backend_params(trainer, b, tmp_path), expected_b, atol=REF_ATOL)
    trainer.remove_adapter(a)
    trainer.remove_adapter(b)


def test_grad_accumulation(trainer, tmp_path):
    lora = LoraSpec(rank=4, alpha=8.0, seed=5)
    data = make_data(30, (4, 6, 5, 3))
    whole, halves = new_id(), new_id()
    trainer.create_adapter(whole, TINY_MODEL_NAME, lora)
    trainer.create_adapter(halves, TINY_MODEL_NAME, lora)
    trainer.forward_backward([FwdBwdRequest(whole, data)])
    trainer.forward_backward([FwdBwdRequest(halves, data[:2])])
    trainer.forward_backward([FwdBwdRequest(halves, data[2:])])
    trainer.optim_step(whole, ADAM)
    trainer.optim_step(halves, ADAM)
    # Different padding -> float32 noise in the gradients, which Adam's first step amplifies near g = 0 (~1e-6).
    assert_params_close(backend_params(trainer, whole, tmp_path), backend_params(trainer, halves, tmp_path), atol=1e-5)
    trainer.remove_adapter(whole)
    trainer.remove_adapter(halves)


def test_bad_inputs_name_the_field(trainer, tmp_path):
    model_id = new_id()
    trainer.create_adapter(model_id, TINY_MODEL_NAME, LoraSpec(rank=2, seed=0))
    before = backend_params(trainer, model_id, tmp_path)

    def bad(data, field):  # a failed request is returned in its slot, not raised
        [result] = trainer.forward_backward([FwdBwdRequest(model_id, data)])
        assert isinstance(result, UserError) and re.search(field, str(result)), result

    bad([], r"data: empty batch")
    good = make_data(40, (3, 4))
    d = make_data(41, (3, 4))
    d[1].tokens[2] = VOCAB
    bad(d, r"data\[1\]\.model_input")
    d = make_data(42, (3, 4))
    d[0].loss_fn_inputs["target_tokens"][0] = -1
    bad(d, r"data\[0\]\.loss_fn_inputs\.target_tokens")
    d = make_data(43, (3, 4))
    d[1].loss_fn_inputs["target_tokens"] = d[1].loss_fn_inputs["target_tokens"][:3]
    bad(d, r"data\[1\]\.loss_fn_inputs\.target_tokens")
    d = make_data(44, (3, 4))
    d[0].loss_fn_inputs["weights"] = np.ones(5, np.float32)
    bad(d, r"data\[0\]\.loss_fn_inputs\.weights")
    [missing] = trainer.forward_backward([FwdBwdRequest("nobody:train:0", good)])
    assert isinstance(missing, NotFound) and "model_id" in str(missing)
    with pytest.raises(UserError, match="model_id"):
        trainer.optim_step("nobody:train:0", ADAM)
    # A batch whose second request is bad: the bad one fails alone, the good one runs (forward only here, so the
    # adapter's gradients stay untouched and the step below changes nothing).
    ok, failed = trainer.forward_backward(
        [FwdBwdRequest(model_id, good, forward_only=True), FwdBwdRequest(model_id, [])]
    )
    assert isinstance(failed, UserError) and not isinstance(ok, Exception) and len(ok.loss_fn_outputs) == 2
    trainer.optim_step(model_id, ADAM)
    assert_params_close(backend_params(trainer, model_id, tmp_path), before, atol=0)
    with pytest.raises(UserError, match="adam_params.learning_rate"):
        trainer.optim_step(model_id, AdamSpec(learning_rate=-1.0))
    with pytest.raises(UserError, match="base_model"):
        trainer.create_adapter(new_id(), "nobody/nothing", LoraSpec())
    with pytest.raises(UserError, match="lora_config"):
        trainer.create_adapter(
            new_id(), TINY_MODEL_NAME, LoraSpec(train_attn=False, train_mlp=False, train_unembed=False)
        )
    with pytest.raises(UserError, match="lora_config.rank"):
        trainer.create_adapter(new_id(), TINY_MODEL_NAME, LoraSpec(rank=0))
    trainer.remove_adapter(model_id)


def test_save_load_round_trip(trainer, hf_settings, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = LoraSpec(rank=4, alpha=8.0, seed=9)
    src, dst = new_id(), new_id()
    trainer.create_adapter(src, TINY_MODEL_NAME, lora)
    trainer.forward_backward([FwdBwdRequest(src, make_data(50))])
    trainer.optim_step(src, ADAM)
    size = trainer.save_state(src, str(tmp_path / "ck"), True)
    assert size > 0 and {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= {
        p.name for p in (tmp_path / "ck").iterdir()
    }
    trainer.create_adapter(dst, TINY_MODEL_NAME, lora)
    trainer.load_state(dst, str(tmp_path / "ck"), with_optimizer=True)
    for model_id in (src, dst):  # same weights + same Adam moments -> same next step
        trainer.forward_backward([FwdBwdRequest(model_id, make_data(51))])
        trainer.optim_step(model_id, ADAM)
    assert_params_close(backend_params(trainer, src, tmp_path), backend_params(trainer, dst, tmp_path), atol=0)
    # The saved adapter is plain PEFT format.
    data = make_data(52)
    trainer.save_state(src, str(tmp_path / "ck2"), False)
    base = AutoModelForCausalLM.from_pretrained(
        str(Path(hf_settings.models_dir) / TINY_MODEL_NAME), dtype=torch.float32
    )
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "ck2")).eval()
    [result] = trainer.forward_backward([FwdBwdRequest(src, data, forward_only=True)])
    with torch.no_grad():
        expected = ref_logprobs(peft_model, data)
    for out, exp in zip(result.loss_fn_outputs, expected):
        np.testing.assert_allclose(out["logprobs"], exp.numpy(), atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="path"):
        trainer.load_state(dst, str(tmp_path / "ck2"), with_optimizer=True)  # no optimizer.pt there
    other = new_id()
    trainer.create_adapter(other, TINY_MODEL_NAME, LoraSpec(rank=2, seed=1))
    with pytest.raises(UserError, match="does not match"):
        trainer.load_state(other, str(tmp_path / "ck"), with_optimizer=False)
    status = trainer.status()
    assert (
        {src, dst, other} <= set(status["adapters"])
        and TINY_MODEL_NAME in status["base_models"]
        and status["memory_bytes"] > 0
    )
    for model_id in (src, dst, other):
        trainer.remove_adapter(model_id)
    assert not {src, dst, other} & set(trainer.status()["adapters"])


# ---- sampling -----------------------------------------------------------------------------------------------------
PROMPT = [1, 504, 3158, 314, 260, 3575, 282, 4649, 47, 2]


def forward_logprobs(hf_settings, tokens: list[int], adapter_dir: str | None = None) -> np.ndarray:
    """logprob of tokens[j] given tokens[:j], j >= 1, by one plain forward pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(Path(hf_settings.models_dir) / TINY_MODEL_NAME), dtype=torch.float32
    ).eval()
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0]
    return logits[:-1].log_softmax(-1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0].numpy()


def test_greedy_is_deterministic_and_logprobs_match(sampler, hf_settings):
    spec = SamplingSpec(max_tokens=8, temperature=0.0, stop=[])
    r1 = sampler.sample(TINY_MODEL_NAME, None, PROMPT, spec, prompt_logprobs=True, topk_prompt_logprobs=3)
    r2 = sampler.sample(TINY_MODEL_NAME, None, PROMPT, spec)
    seq = r1.sequences[0]
    assert seq.tokens == r2.sequences[0].tokens and len(seq.tokens) == 8 and seq.stop_reason == "length"
    lp = forward_logprobs(hf_settings, PROMPT + seq.tokens)
    np.testing.assert_allclose(seq.logprobs, lp[len(PROMPT) - 1 :], atol=1e-4)
    assert r1.prompt_logprobs[0] is None and len(r1.prompt_logprobs) == len(PROMPT)
    np.testing.assert_allclose(r1.prompt_logprobs[1:], lp[: len(PROMPT) - 1], atol=1e-4)
    assert r1.topk_prompt_logprobs[0] == [] and all(len(row) == 3 for row in r1.topk_prompt_logprobs[1:])
    first = r1.topk_prompt_logprobs[1]
    assert first[0][1] >= first[1][1] >= first[2][1] and first[0][1] >= r1.prompt_logprobs[1]


def test_seed_and_num_samples(sampler):
    spec = SamplingSpec(max_tokens=6, temperature=1.0, seed=123, stop=[])
    a = sampler.sample(TINY_MODEL_NAME, None, PROMPT, spec, num_samples=4)
    b = sampler.sample(TINY_MODEL_NAME, None, PROMPT, spec, num_samples=4)
    assert len(a.sequences) == 4 and all(len(s.tokens) == 6 == len(s.logprobs) for s in a.sequences)
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    c = sampler.sample(
        TINY_MODEL_NAME, None, PROMPT, SamplingSpec(max_tokens=6, temperature=1.0, seed=124, stop=[]), num_samples=4
    )
    assert [s.tokens for s in a.sequences] != [s.tokens for s in c.sequences]
    topk = sampler.sample(
        TINY_MODEL_NAME, None, PROMPT, SamplingSpec(max_tokens=6, temperature=1.0, top_k=1, seed=5, stop=[])
    )
    greedy = sampler.sample(TINY_MODEL_NAME, None, PROMPT, SamplingSpec(max_tokens=6, temperature=0.0, stop=[]))
    assert topk.sequences[0].tokens == greedy.sequences[0].tokens  # top_k=1 is greedy
    with pytest.raises(UserError, match="num_samples"):
        sampler.sample(TINY_MODEL_NAME, None, PROMPT, spec, num_samples=0)
    with pytest.raises(UserError, match="prompt"):
        sampler.sample(TINY_MODEL_NAME, None, [VOCAB], spec)
    with pytest.raises(UserError, match="sampling_params.temperature"):
        sampler.sample(TINY_MODEL_NAME, None, PROMPT, SamplingSpec(temperature=-1.0))


def test_stop_tokens_and_strings(sampler):
    greedy = (
        sampler.sample(TINY_MODEL_NAME, None, PROMPT, SamplingSpec(max_tokens=10, temperature=0.0, stop=[]))
        .sequences[0]
        .tokens
    )
    stop_id = greedy[3]
    cut = greedy.index(stop_id) + 1
    seq = sampler.sample(
        TINY_MODEL_NAME, None, PROMPT, SamplingSpec(max_tokens=10, temperature=0.0, stop=[stop_id])
    ).sequences[0]
    assert seq.tokens == greedy[:cut] and seq.tokens[-1] == stop_id and seq.stop_reason == "stop"
    from backends.hf import get_base

    tokenizer = get_base(TINY_MODEL_NAME, sampler.settings, sampler.device).tokenizer
    text = tokenizer.decode(greedy[2:4])
    seq = sampler.sample(
        TINY_MODEL_NAME, None, PROMPT, SamplingSpec(max_tokens=10, temperature=0.0, stop=[text])
    ).sequences[0]
    assert (
        seq.stop_reason == "stop"
        and text in tokenizer.decode(seq.tokens)
        and text not in tokenizer.decode(seq.tokens[:-1])
    )
    assert seq.tokens == greedy[: len(seq.tokens)] and len(seq.tokens) <= 4


def test_sampling_with_saved_adapter(trainer, sampler, hf_settings, tmp_path):
    model_id = new_id()
    trainer.create_adapter(model_id, TINY_MODEL_NAME, LoraSpec(rank=4, alpha=8.0, seed=2))
    target = PROMPT[1:] + [77]
    datum = Datum(
        tokens=np.array(PROMPT),
        loss_fn_inputs={"target_tokens": np.array(target), "weights": np.ones(len(PROMPT), np.float32)},
    )
    for _ in range(3):
        trainer.forward_backward([FwdBwdRequest(model_id, [datum])])
        trainer.optim_step(model_id, AdamSpec(learning_rate=5e-2))
    trainer.save_state(model_id, str(tmp_path / "sampler"), False)
    spec = SamplingSpec(max_tokens=4, temperature=0.0, stop=[])
    tuned = sampler.sample(TINY_MODEL_NAME, str(tmp_path / "sampler"), PROMPT, spec, prompt_logprobs=True)
    plain = sampler.sample(TINY_MODEL_NAME, None, PROMPT, spec, prompt_logprobs=True)
    expected = forward_logprobs(hf_settings, PROMPT, str(tmp_path / "sampler"))
    np.testing.assert_allclose(tuned.prompt_logprobs[1:], expected, atol=1e-4)
    assert tuned.prompt_logprobs[1] > plain.prompt_logprobs[1] + 0.1
    # The training adapter is unaffected by sampling on the same base model.
    [r] = trainer.forward_backward([FwdBwdRequest(model_id, [datum], forward_only=True)])
    np.testing.assert_allclose(r.loss_fn_outputs[0]["logprobs"][:-1], expected, atol=1e-5)
    with pytest.raises(UserError, match="model_path"):
        sampler.sample(TINY_MODEL_NAME, str(tmp_path / "missing"), PROMPT, spec)
    trainer.remove_adapter(model_id)


def test_loader_picks_and_caches(hf_settings):
    from backends.loader import (
        BackendUnavailable,
        get_sampling_backend,
        get_training_backend,
    )

    assert get_training_backend(hf_settings) is get_training_backend(hf_settings)
    assert type(get_sampling_backend(hf_settings)).__name__ == "HFSamplingBackend"
    with pytest.raises(BackendUnavailable, match="install"):
        get_sampling_backend(Settings(sampling_backend="vllm", device="cpu"))
    with pytest.raises(BackendUnavailable, match="nope"):
        get_training_backend(Settings(training_backend="nope"))


def test_models_resolution_is_torch_free(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; from backends.models import is_known_model, resolve_model_dir; from core.settings import Settings;"
        f"s = Settings(data_dir={str(tmp_path)!r});"
        "assert is_known_model('HuggingFaceTB/SmolLM2-135M-Instruct', s);"
        "assert not is_known_model('nobody/nothing', s) and not is_known_model('../etc', s);"
        "assert resolve_model_dir('HuggingFaceTB/SmolLM2-135M-Instruct', s, convert=False) is None;"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


# ---- the real default model ---------------------------------------------------------------------------------------
@pytest.mark.smollm2
def test_smollm2_conversion_says_paris(tmp_path):
    from backends.hf import HFSamplingBackend
    from backends.models import (
        converted_dir,
        ensure_tokenizer_in_hf_cache,
        resolve_model_dir,
    )
    from core.settings import DEFAULT_BASE_MODEL

    settings = Settings(data_dir=str(tmp_path / "data"), device="cpu")
    path = resolve_model_dir(DEFAULT_BASE_MODEL, settings)
    assert path == converted_dir(DEFAULT_BASE_MODEL, settings) and (path / "model.safetensors").is_file()
    snapshot = ensure_tokenizer_in_hf_cache(DEFAULT_BASE_MODEL, settings, hf_home=tmp_path / "hf")
    assert (snapshot / "tokenizer.json").is_file() and len((snapshot.parent.parent / "refs" / "main").read_text()) == 40
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(snapshot))
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    prompt = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
    result = HFSamplingBackend(settings).sample(
        DEFAULT_BASE_MODEL, None, prompt, SamplingSpec(max_tokens=16, temperature=0.0)
    )
    seq = result.sequences[0]
    assert "Paris" in tokenizer.decode(seq.tokens) and seq.stop_reason == "stop"
