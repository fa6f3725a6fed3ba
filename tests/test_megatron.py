"""The megatron backend against the HF backend (same weights, same batch) and against itself at tensor parallel 2.

CPU, tiny Llama / Qwen2 / Qwen3. The tensor-parallel-2 backend lives in a helper process (its rank 0; it starts
rank 1 itself), started once for the module, since a process belongs to one torch.distributed group.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed: pip install megatron-core==0.16.1")

from backends.base import AdamSpec, Datum, FwdBwdRequest, FwdBwdResult, LoraSpec
from core.errors import UserError
from core.settings import Settings
from tests.tiny_model import TINY_MODEL_NAME, build_tiny_model
from tests.tiny_qwen3 import TINY_QWEN2_NAME, TINY_QWEN3_NAME, build_tiny_qwen2, build_tiny_qwen3

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEVICE = os.environ.get("TINKERBELL_MEGATRON_TEST_DEVICE", "cpu")  # scripts/gpu_check_megatron.sh sets cuda:0
VOCAB = 49152
LORA = LoraSpec(rank=4, alpha=8.0, seed=3)
ADAM = AdamSpec(learning_rate=1e-3, eps=1e-8, grad_clip_norm=1.0)  # eps 1e-12 turns ~1e-13 float noise into steps
_REPO = Path(__file__).resolve().parent.parent
_ids = iter(range(10**6))


def new_id() -> str:
    return f"mg{next(_ids)}:train:0"


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    models = tmp_path_factory.mktemp("mg-models")
    build_tiny_model(models / TINY_MODEL_NAME)
    build_tiny_qwen3(models / TINY_QWEN3_NAME)
    build_tiny_qwen2(models / TINY_QWEN2_NAME)
    return Settings(
        models_dir=str(models), data_dir=str(tmp_path_factory.mktemp("mg-data")), device=DEVICE, dtype="float32"
    )


@pytest.fixture(scope="module")
def hf(settings):
    from backends.hf_train import HFTrainingBackend

    return HFTrainingBackend(settings)


@pytest.fixture(scope="module")
def mg(settings):
    from backends.megatron import MegatronTrainingBackend

    return MegatronTrainingBackend(settings)


class _Remote:
    """A backend in another process: method calls go over a local socket, results and exceptions come back."""

    def __init__(self, conn: Any, process: subprocess.Popen[bytes]) -> None:
        self.conn, self.process = conn, process

    def __getattr__(self, method: str) -> Any:
        def call(*args: Any) -> Any:
            self.conn.send((method, args))
            ok, value = self.conn.recv()
            if not ok:
                raise value
            return value

        return call


def _serve(address: str, authkey: str, settings: Settings) -> None:
    """Helper process body: host a MegatronTrainingBackend and run the calls the test sends."""
    from multiprocessing.connection import Client

    from backends.megatron import MegatronTrainingBackend

    host, port = address.rsplit(":", 1)
    with Client((host, int(port)), authkey=bytes.fromhex(authkey)) as conn:
        backend = MegatronTrainingBackend(settings)
        conn.send((True, "ready"))
        while (message := conn.recv()) is not None:
            method, args = message
            try:
                conn.send((True, getattr(backend, method)(*args)))
            except Exception as exc:  # noqa: BLE001 - sent back to the test
                conn.send((False, exc))
        backend.close()


@pytest.fixture(scope="module")
def tp2(settings):
    from multiprocessing.connection import Listener

    devices = "cpu"
    if DEVICE.startswith("cuda"):
        if torch.cuda.device_count() < 2:
            pytest.skip("tensor parallel 2 on CUDA needs two GPUs")
        devices = "cuda:0,cuda:1"
    authkey = secrets.token_bytes(16)
    tp_settings = dataclasses.replace(settings, tensor_parallel=2, device=devices)
    with Listener(("127.0.0.1", 0), authkey=authkey) as listener:
        host, port = listener.address
        code = (
            "import sys, pickle; from tests.test_megatron import _serve; _serve(sys.argv[1], sys.argv[2], "
            "pickle.loads(bytes.fromhex(sys.argv[3])))"
        )
        args = [f"{host}:{port}", authkey.hex(), pickle.dumps(tp_settings).hex()]
        process = subprocess.Popen(
            [sys.executable, "-c", code, *args], cwd=_REPO, env=dict(os.environ, PYTHONPATH=str(_REPO))
        )
        conn = listener.accept()
    assert conn.recv() == (True, "ready")
    yield _Remote(conn, process)
    conn.send(None)
    process.wait(timeout=60)


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


def random_checkpoint(hf, base_model: str, lora: LoraSpec, directory: Path, seed: int) -> Path:
    """A PEFT checkpoint of `lora` on `base_model` with random non-zero A and B (written by the HF backend)."""
    from safetensors.torch import load_file, save_file

    model_id = new_id()
    hf.create_adapter(model_id, base_model, lora)
    hf.save_state(model_id, str(directory), True)
    hf.remove_adapter(model_id)
    state = load_file(str(directory / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    save_file(
        {k: torch.randn(v.shape, generator=generator) * 0.05 for k, v in state.items()},
        str(directory / "adapter_model.safetensors"),
    )
    (directory / "optimizer.pt").unlink()
    return directory


def adapter_from(backend, base_model: str, lora: LoraSpec, checkpoint: Path, with_optimizer: bool = False) -> str:
    model_id = new_id()
    backend.create_adapter(model_id, base_model, lora)
    backend.load_state(model_id, str(checkpoint), with_optimizer)
    return model_id


def saved_weights(backend, model_id: str, directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    backend.save_state(model_id, str(directory), True)
    return load_file(str(directory / "adapter_model.safetensors"))


def assert_same_results(got: FwdBwdResult, want: FwdBwdResult, atol: float) -> None:
    assert isinstance(got, FwdBwdResult), got
    assert isinstance(want, FwdBwdResult), want
    for a, b in zip(got.loss_fn_outputs, want.loss_fn_outputs, strict=True):
        assert a["logprobs"].shape == b["logprobs"].shape and a["logprobs"].dtype == np.float32
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], rtol=0, atol=atol)
    assert set(got.metrics) == set(want.metrics)
    for key, value in want.metrics.items():
        assert abs(got.metrics[key] - value) <= atol * max(1.0, abs(value)), (key, got.metrics[key], value)


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].shape == value.shape, key
        torch.testing.assert_close(got[key], value, rtol=0, atol=atol, msg=key)


# ---- parity with the HF backend ------------------------------------------------------------------------------
@pytest.mark.parametrize("base_model", [TINY_MODEL_NAME, TINY_QWEN2_NAME, TINY_QWEN3_NAME])
def test_logprobs_loss_and_one_step_equal_hf_backend(mg, hf, base_model, tmp_path):
    checkpoint = random_checkpoint(hf, base_model, LORA, tmp_path / "init", seed=1)
    on_mg, on_hf = adapter_from(mg, base_model, LORA, checkpoint), adapter_from(hf, base_model, LORA, checkpoint)
    data = make_data(1)
    (got,) = mg.forward_backward([FwdBwdRequest(on_mg, data)])
    (want,) = hf.forward_backward([FwdBwdRequest(on_hf, data)])
    assert_same_results(got, want, atol=1e-4)
    step_mg, step_hf = mg.optim_step(on_mg, ADAM), hf.optim_step(on_hf, ADAM)
    assert (
        set(step_mg) == set(step_hf)
        and abs(step_mg["grad_norm:mean"] - step_hf["grad_norm:mean"]) < 1e-4 * step_hf["grad_norm:mean"]
    )
    assert_same_weights(saved_weights(mg, on_mg, tmp_path / "mg"), saved_weights(hf, on_hf, tmp_path / "hf"), atol=1e-5)


def test_fresh_adapter_is_peft_shaped_and_starts_at_the_base_model(mg, hf, tmp_path):
    lora = LoraSpec(rank=2, seed=5, train_mlp=False)
    on_mg, on_hf = new_id(), new_id()
    info_mg, info_hf = mg.create_adapter(on_mg, TINY_QWEN3_NAME, lora), hf.create_adapter(on_hf, TINY_QWEN3_NAME, lora)
    assert info_mg["trainable_params"] == info_hf["trainable_params"] and info_mg["vocab_size"] == info_hf["vocab_size"]
    assert mg.create_adapter(on_mg, TINY_QWEN3_NAME, lora)["model_id"] == on_mg  # idempotent
    got, want = saved_weights(mg, on_mg, tmp_path / "mg"), saved_weights(hf, on_hf, tmp_path / "hf")
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    assert all(not v.any() for k, v in got.items() if "lora_B" in k)  # B = 0: the adapter starts as the base model
    data = make_data(2, lengths=(4, 6))
    forward = [FwdBwdRequest(on_mg, data, forward_only=True)]
    assert_same_results(
        mg.forward_backward(forward)[0], hf.forward_backward([FwdBwdRequest(on_hf, data, forward_only=True)])[0], 1e-4
    )
    assert (tmp_path / "mg" / "adapter_config.json").read_text() == (
        tmp_path / "hf" / "adapter_config.json"
    ).read_text()


# ---- tensor parallel ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base_model", [TINY_QWEN3_NAME, TINY_MODEL_NAME])  # Llama: 1 KV head < 2 ranks
def test_tensor_parallel_2_equals_tensor_parallel_1(mg, hf, tp2, base_model, tmp_path):
    checkpoint = random_checkpoint(hf, base_model, LORA, tmp_path / "init", seed=2)
    one, two = adapter_from(mg, base_model, LORA, checkpoint), adapter_from(tp2, base_model, LORA, checkpoint)
    data = make_data(3, lengths=(6, 2, 7))
    for _ in range(2):  # two steps, so the second runs on sharded optimizer state
        (want,) = mg.forward_backward([FwdBwdRequest(one, data)])
        (got,) = tp2.forward_backward([FwdBwdRequest(two, data)])
        assert_same_results(got, want, atol=1e-5)
        step_one, step_two = mg.optim_step(one, ADAM), tp2.optim_step(two, ADAM)
        assert abs(step_one["grad_norm:mean"] - step_two["grad_norm:mean"]) < 1e-5 * step_one["grad_norm:mean"]
    assert_same_weights(saved_weights(tp2, two, tmp_path / "two"), saved_weights(mg, one, tmp_path / "one"), atol=1e-5)
    moments_two = torch.load(tmp_path / "two" / "optimizer.pt", weights_only=True)
    moments_one = torch.load(tmp_path / "one" / "optimizer.pt", weights_only=True)
    for i, state in moments_one["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(moments_two["state"][i][name], state[name], rtol=1e-4, atol=1e-7)
    assert tp2.status()["tensor_parallel"] == 2


# ---- checkpoints move between the backends ----------------------------------------------------------------
def test_adapter_trained_on_megatron_loads_into_hf_with_the_same_logprobs(mg, hf, tmp_path):
    checkpoint = random_checkpoint(hf, TINY_MODEL_NAME, LORA, tmp_path / "init", seed=4)
    trained = adapter_from(mg, TINY_MODEL_NAME, LORA, checkpoint)
    for seed in (5, 6):
        mg.forward_backward([FwdBwdRequest(trained, make_data(seed))])
        mg.optim_step(trained, ADAM)
    mg.save_state(trained, str(tmp_path / "trained"), True)
    on_hf = adapter_from(hf, TINY_MODEL_NAME, LORA, tmp_path / "trained", with_optimizer=True)
    data = make_data(7, k=3)  # (N, K) targets too
    (want,) = mg.forward_backward([FwdBwdRequest(trained, data, forward_only=True)])
    (got,) = hf.forward_backward([FwdBwdRequest(on_hf, data, forward_only=True)])
    assert_same_results(got, want, atol=1e-4)


def test_adapter_trained_on_hf_loads_into_megatron_and_trains_on_alike(mg, hf, tmp_path):
    checkpoint = random_checkpoint(hf, TINY_QWEN3_NAME, LORA, tmp_path / "init", seed=8)
    trained = adapter_from(hf, TINY_QWEN3_NAME, LORA, checkpoint)
    hf.forward_backward([FwdBwdRequest(trained, make_data(9))])
    hf.optim_step(trained, ADAM)
    hf.save_state(trained, str(tmp_path / "trained"), True)
    on_mg = adapter_from(mg, TINY_QWEN3_NAME, LORA, tmp_path / "trained", with_optimizer=True)
    data = make_data(10)
    (got,) = mg.forward_backward([FwdBwdRequest(on_mg, data)])
    (want,) = hf.forward_backward([FwdBwdRequest(trained, data)])
    assert_same_results(got, want, atol=1e-4)
    mg.optim_step(on_mg, ADAM)  # the restored Adam moments take part
    hf.optim_step(trained, ADAM)
    assert_same_weights(
        saved_weights(mg, on_mg, tmp_path / "mg"), saved_weights(hf, trained, tmp_path / "hf"), atol=1e-5
    )


# ---- several adapters in one pass -----------------------------------------------------------------------------
def test_two_adapters_in_one_pass_equal_each_alone(mg, hf, tmp_path):
    other = LoraSpec(rank=2, alpha=4.0, seed=4, train_attn=False)
    first = random_checkpoint(hf, TINY_QWEN3_NAME, LORA, tmp_path / "a", seed=11)
    second = random_checkpoint(hf, TINY_QWEN3_NAME, other, tmp_path / "b", seed=12)
    together = [adapter_from(mg, TINY_QWEN3_NAME, LORA, first), adapter_from(mg, TINY_QWEN3_NAME, other, second)]
    alone = [adapter_from(mg, TINY_QWEN3_NAME, LORA, first), adapter_from(mg, TINY_QWEN3_NAME, other, second)]
    data = [make_data(13, lengths=(3, 8)), make_data(14, lengths=(5,))]
    joint = mg.forward_backward(
        [FwdBwdRequest(together[0], data[0]), FwdBwdRequest(together[1], data[1], loss_fn="cross_entropy")]
    )
    for i in range(2):
        assert_same_results(joint[i], mg.forward_backward([FwdBwdRequest(alone[i], data[i])])[0], atol=1e-5)
        mg.optim_step(together[i], ADAM)
        mg.optim_step(alone[i], ADAM)
        weights_joint = saved_weights(mg, together[i], tmp_path / f"joint{i}")
        assert_same_weights(weights_joint, saved_weights(mg, alone[i], tmp_path / f"alone{i}"), atol=1e-5)


def test_a_bad_request_fails_alone_and_leaves_the_others_gradients(mg, hf, tmp_path):
    checkpoint = random_checkpoint(hf, TINY_MODEL_NAME, LORA, tmp_path / "init", seed=15)
    batch_ids = [adapter_from(mg, TINY_MODEL_NAME, LORA, checkpoint) for _ in range(3)]
    reference = adapter_from(mg, TINY_MODEL_NAME, LORA, checkpoint)
    data = make_data(16)
    out_of_vocab = [Datum(tokens=np.array([1, VOCAB + 5]), loss_fn_inputs={"target_tokens": np.array([1, 2])})]
    results = mg.forward_backward(
        [
            FwdBwdRequest(batch_ids[0], data),
            FwdBwdRequest(batch_ids[1], out_of_vocab),
            FwdBwdRequest(batch_ids[2], data, loss_fn="no_such_loss"),
            FwdBwdRequest("nobody:train:0", data),
        ]
    )
    assert isinstance(results[1], UserError) and "outside the vocabulary" in str(results[1])
    assert isinstance(results[2], UserError) and isinstance(results[3], UserError)
    assert_same_results(results[0], mg.forward_backward([FwdBwdRequest(reference, data)])[0], atol=1e-5)
    for model_id in (batch_ids[0], reference, batch_ids[2]):
        mg.optim_step(model_id, ADAM)
    assert_same_weights(
        saved_weights(mg, batch_ids[0], tmp_path / "x"), saved_weights(mg, reference, tmp_path / "r"), atol=1e-5
    )
    fresh = adapter_from(mg, TINY_MODEL_NAME, LORA, checkpoint)
    assert_same_weights(
        saved_weights(mg, batch_ids[2], tmp_path / "u"), saved_weights(mg, fresh, tmp_path / "c"), atol=0.0
    )


def test_discard_gradients_and_remove_adapter(mg, hf, tmp_path):
    checkpoint = random_checkpoint(hf, TINY_MODEL_NAME, LORA, tmp_path / "init", seed=17)
    model_id = adapter_from(mg, TINY_MODEL_NAME, LORA, checkpoint)
    mg.forward_backward([FwdBwdRequest(model_id, make_data(18))])
    mg.discard_gradients(model_id)
    assert mg.optim_step(model_id, ADAM)["grad_norm:mean"] == 0.0
    assert mg.trainable_parameters(model_id) and all(p.grad is None for p in mg.trainable_parameters(model_id))
    mg.remove_adapter(model_id)
    assert not mg.has_adapter(model_id) and model_id not in mg.status()["adapters"]


# ---- set-up -------------------------------------------------------------------------------------------------
def test_missing_megatron_core_says_how_to_install(settings, monkeypatch):
    from backends.loader import TRAINING_BACKENDS, BackendUnavailable
    from backends.megatron import MegatronTrainingBackend

    monkeypatch.setitem(sys.modules, "megatron", None)
    monkeypatch.setitem(sys.modules, "megatron.core", None)
    with pytest.raises(BackendUnavailable, match=r"pip install megatron-core==0\.16\.1"):
        MegatronTrainingBackend(settings)
    assert "megatron-core==0.16.1" in TRAINING_BACKENDS["megatron"][2]


def test_device_list_must_match_tensor_parallel(settings):
    from backends.loader import BackendUnavailable
    from backends.megatron import MegatronTrainingBackend

    with pytest.raises(BackendUnavailable, match="TINKERBELL_TENSOR_PARALLEL"):
        MegatronTrainingBackend(dataclasses.replace(settings, device="cuda:0,cuda:1", tensor_parallel=3))


def test_cpu_shims_still_fit_megatron_core(mg):
    from backends.megatron_cpu import check_cpu_shims

    if DEVICE != "cpu":
        pytest.skip("the CPU shims are not used on a GPU")
    check_cpu_shims()


def test_sdk_trains_through_the_service_on_megatron_and_samples_from_it(make_stack):
    """USE_MEGATRON=true end to end: the official SDK, a real worker on the Megatron backend, HF sampling."""
    import tinker
    from tinker import types

    from tests.stackutil import TINY_MODEL

    os.environ["TINKER_TELEMETRY"] = "0"
    stack = make_stack(1, {"TINKERBELL_AUTH": "off", "USE_MEGATRON": "true"})
    service = tinker.ServiceClient(base_url=stack.url, api_key="tml-megatron")
    tc = service.create_lora_training_client(TINY_MODEL, rank=8, seed=0).result(timeout=120)
    [worker] = stack.registry().live_workers()
    assert worker["training_backend"] == "megatron"
    rng = np.random.default_rng(0)
    batch = []
    for _ in range(4):
        tokens = rng.integers(1, 300, size=13)
        weights = [0.0] * 4 + [1.0] * 8
        batch.append(
            tinker.Datum(
                model_input=tinker.ModelInput.from_ints(tokens[:-1].tolist()),
                loss_fn_inputs={"target_tokens": tokens[1:].tolist(), "weights": weights},
            )
        )
    losses = []
    for _ in range(20):
        fwdbwd = tc.forward_backward(batch, "cross_entropy")
        step = tc.optim_step(types.AdamParams(learning_rate=2e-2))
        losses.append(fwdbwd.result(timeout=120).metrics["loss:sum"])
        step.result(timeout=120)
    assert losses[-1] < 0.5 * losses[0], losses
    sampler = tc.save_weights_and_get_sampling_client("megatron-sft").result(timeout=120)
    prompt = batch[0].model_input
    out = sampler.sample(prompt, num_samples=1, sampling_params=types.SamplingParams(max_tokens=8, temperature=0.0))
    tokens = out.result(timeout=120).sequences[0].tokens
    assert len(tokens) == 8 and all(0 <= t < VOCAB for t in tokens)
    # The sampler serves the weights Megatron trained: HF's prompt logprobs equal Megatron's forward logprobs.
    full = prompt.to_ints() + [int(batch[0].loss_fn_inputs["target_tokens"].tolist()[-1])]
    sampled = sampler.compute_logprobs(tinker.ModelInput.from_ints(full)).result(timeout=120)
    trained = tc.forward([batch[0]], "cross_entropy").result(timeout=120).loss_fn_outputs[0]["logprobs"].tolist()
    np.testing.assert_allclose(
        np.asarray(sampled[1:], dtype=np.float32), np.asarray(trained, dtype=np.float32), atol=1e-3
    )


def test_a_megatron_worker_without_megatron_core_refuses_to_start_saying_how_to_install(tmp_path):
    shadow = tmp_path / "megatron"  # a `megatron` package without `megatron.core`, ahead of the real one
    shadow.mkdir()
    (shadow / "__init__.py").write_text("")
    env = {
        **os.environ,
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{_REPO}",
        "USE_MEGATRON": "true",
        "TINKERBELL_BROKER_URL": "redis://127.0.0.1:9/0",
    }  # never reached: it must stop before connecting
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.worker", "--device", "cpu", "--name", "nomegatron"],
        check=False,
        cwd=_REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "pip install megatron-core==0.16.1" in proc.stderr, proc.stderr[-2000:]
