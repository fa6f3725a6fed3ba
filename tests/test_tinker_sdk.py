"""The unmodified official `tinker` SDK (0.38) over HTTP against a real stack: training, sampling, REST, CLI, errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests
import tinker
import torch
import zstandard
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

from client import TinkerbellClient
from tests.stackutil import TINY_MODEL

os.environ["TINKER_TELEMETRY"] = "0"
KEY = "tml-sdk-tests"


def make_datum(seed: int, length: int = 12, vocab: int = 300) -> tinker.Datum:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=length + 1)
    weights = np.ones(length, dtype=np.float32)
    weights[: length // 3] = 0.0
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1].tolist()),
        loss_fn_inputs={"target_tokens": tokens[1:].tolist(), "weights": weights.tolist()},
    )


def native_datum(datum: tinker.Datum) -> dict:
    return {
        "model_input": datum.model_input.to_ints(),
        "loss_fn_inputs": {k: v.tolist() for k, v in datum.loss_fn_inputs.items()},
    }


def logprobs(output: dict) -> np.ndarray:
    return np.asarray(output["logprobs"].tolist(), dtype=np.float32)


@pytest.fixture(scope="module")
def service(stack) -> tinker.ServiceClient:
    client = tinker.ServiceClient(base_url=stack.url, api_key=KEY)
    yield client
    client.close("success").result(timeout=30)


def new_client(service: tinker.ServiceClient, seed: int = 0, rank: int = 8) -> tinker.TrainingClient:
    return service.create_lora_training_client(TINY_MODEL, rank=rank, seed=seed).result(timeout=120)


ADAM = types.AdamParams(learning_rate=2e-2)


def test_sft_twenty_steps_loss_falls_and_equals_the_native_path(stack, service):
    batch = [make_datum(s) for s in range(4)]
    tc = new_client(service, seed=0)
    sdk_losses = []
    for _ in range(20):
        fwdbwd = tc.forward_backward(batch, "cross_entropy")
        step = tc.optim_step(ADAM)
        sdk_losses.append(fwdbwd.result(timeout=60).metrics["loss:sum"])
        step.result(timeout=60)
    assert sdk_losses[-1] < 0.5 * sdk_losses[0], sdk_losses

    tb = TinkerbellClient(stack.url, api_key=KEY)
    model_id = tb.add_lora(rank=8, seed=0).result(120)["model_id"]
    native = [native_datum(d) for d in batch]
    native_losses = []
    for _ in range(20):
        native_losses.append(tb.forward_backward(model_id, native).result(60)["metrics"]["loss:sum"])
        tb.optim_step(model_id, **ADAM.model_dump()).result(60)
    np.testing.assert_allclose(sdk_losses, native_losses, rtol=1e-6)
    info = tc.get_info()
    assert (
        info.model_data.model_name == TINY_MODEL and info.model_data.tokenizer_id == TINY_MODEL and info.lora_rank == 8
    )


def test_rl_step_sample_then_importance_sampling_and_ppo(service):
    tc = new_client(service, seed=1)
    sampler = tc.save_weights_and_get_sampling_client()
    prompt_tokens = [5, 17, 42, 99, 7]
    prompt = tinker.ModelInput.from_ints(prompt_tokens)
    result = sampler.sample(
        prompt, num_samples=4, sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0, seed=3)
    ).result(timeout=60)
    assert len(result.sequences) == 4
    data = []
    for i, seq in enumerate(result.sequences):
        assert seq.logprobs is not None and len(seq.logprobs) == len(seq.tokens) > 0
        assert seq.stop_reason in ("length", "stop") and seq.sequence_id
        full = prompt_tokens + list(seq.tokens)
        n_prompt = len(prompt_tokens) - 1
        data.append(
            tinker.Datum(
                model_input=tinker.ModelInput.from_ints(full[:-1]),
                loss_fn_inputs={
                    "target_tokens": full[1:],
                    "logprobs": [0.0] * n_prompt + list(seq.logprobs),
                    "advantages": [0.0] * n_prompt + [float(i) - 1.5] * len(seq.tokens),
                },
            )
        )
    out = tc.forward_backward(data, "importance_sampling").result(timeout=60)
    for datum, seq, output in zip(data, result.sequences, out.loss_fn_outputs):
        trained = logprobs(output)
        assert trained.shape == (len(datum.model_input.to_ints()),)
        # Same weights on both sides: the trainer's logprobs of the sampled tokens equal the sampler's.
        np.testing.assert_allclose(trained[len(prompt_tokens) - 1 :], seq.logprobs, atol=2e-4)
    assert "loss:sum" in out.metrics
    ppo = tc.forward_backward(data, "ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}).result(timeout=60)
    assert np.isfinite(ppo.metrics["loss:sum"])
    tc.optim_step(ADAM).result(timeout=60)


def test_forward_backward_custom_gives_the_same_update_as_cross_entropy(service):
    batch = [make_datum(s, length=9) for s in (10, 11)]
    custom = new_client(service, seed=2)
    builtin = new_client(service, seed=2)

    def weighted_nll(data: list[tinker.Datum], lps: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = sum((-lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(data, lps))
        return loss, {"custom:sum": float(loss)}

    got = custom.forward_backward_custom(batch, weighted_nll).result(timeout=60)
    want = builtin.forward_backward(batch, "cross_entropy").result(timeout=60)
    assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=1e-5)
    custom.optim_step(ADAM).result(timeout=60)
    builtin.optim_step(ADAM).result(timeout=60)
    after_custom = custom.forward(batch, "cross_entropy").result(timeout=60).loss_fn_outputs
    after_builtin = builtin.forward(batch, "cross_entropy").result(timeout=60).loss_fn_outputs
    for a, b in zip(after_custom, after_builtin):
        np.testing.assert_allclose(logprobs(a), logprobs(b), atol=1e-5)


def test_resume_with_optimizer_continues_exactly_and_without_optimizer_loads_weights_only(service):
    batch = [make_datum(s) for s in (20, 21)]
    original = new_client(service, seed=3)
    for _ in range(2):
        original.forward_backward(batch, "cross_entropy").result(timeout=60)
        original.optim_step(ADAM).result(timeout=60)
    path = original.save_state("resume").result(timeout=60).path
    assert path.startswith("tinker://") and path.endswith("/weights/resume")
    saved_lps = [logprobs(o) for o in original.forward(batch, "cross_entropy").result(timeout=60).loss_fn_outputs]

    resumed = service.create_training_client_from_state_with_optimizer(path).result(timeout=120)
    weights_only = service.create_training_client_from_state(path).result(timeout=120)
    # The SDK names a restored model itself, <session>:train:<n>, in the service client's session (DESIGN, Names).
    session_id = original.model_id.rsplit(":train:", 1)[0]
    for client in (resumed, weights_only):
        assert re.fullmatch(rf"{re.escape(session_id)}:train:\d+", client.model_id), client.model_id
    assert len({original.model_id, resumed.model_id, weights_only.model_id}) == 3
    for client in (resumed, weights_only):
        for got, want in zip(client.forward(batch, "cross_entropy").result(timeout=60).loss_fn_outputs, saved_lps):
            np.testing.assert_allclose(logprobs(got), want, atol=1e-6)
    for client in (original, resumed, weights_only):
        client.forward_backward(batch, "cross_entropy").result(timeout=60)
        client.optim_step(ADAM).result(timeout=60)
    after = {
        name: [logprobs(o) for o in c.forward(batch, "cross_entropy").result(timeout=60).loss_fn_outputs]
        for name, c in (("original", original), ("resumed", resumed), ("weights_only", weights_only))
    }
    for got, want in zip(after["resumed"], after["original"]):
        np.testing.assert_allclose(got, want, atol=1e-6)
    # A fresh Adam state takes a different first step than the restored one.
    assert not all(np.allclose(a, b, atol=1e-6) for a, b in zip(after["weights_only"], after["original"]))


def test_compute_logprobs_equals_forward_logprobs(service):
    tc = new_client(service, seed=4)
    tc.forward_backward([make_datum(30)], "cross_entropy").result(timeout=60)
    tc.optim_step(ADAM).result(timeout=60)
    tokens = [3, 14, 15, 92, 65, 35, 89, 79]
    sampler = tc.save_weights_and_get_sampling_client()
    prompt_lps = sampler.compute_logprobs(tinker.ModelInput.from_ints(tokens)).result(timeout=60)
    assert prompt_lps[0] is None and len(prompt_lps) == len(tokens)
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    forward = logprobs(tc.forward([datum], "cross_entropy").result(timeout=60).loss_fn_outputs[0])
    np.testing.assert_allclose(prompt_lps[1:], forward, atol=2e-4)

    named = tc.save_weights_for_sampler("probe").result(timeout=60).path
    from_path = service.create_sampling_client(model_path=named)
    assert from_path.get_base_model() == TINY_MODEL
    np.testing.assert_allclose(
        from_path.compute_logprobs(tinker.ModelInput.from_ints(tokens)).result(timeout=60)[1:], forward, atol=2e-4
    )


def test_rest_client_lists_and_deletes_and_the_cli_lists_and_downloads(stack, service, tmp_path):
    tc = new_client(service, seed=5)
    tc.forward_backward([make_datum(40)], "cross_entropy").result(timeout=60)
    tc.optim_step(ADAM).result(timeout=60)
    keep = tc.save_state("keep").result(timeout=60).path
    drop = tc.save_state("drop").result(timeout=60).path
    tc.save_weights_for_sampler("for-sampling").result(timeout=60)
    rest = service.create_rest_client()

    runs = rest.list_training_runs(limit=100).result(timeout=30)
    assert tc.model_id in [r.training_run_id for r in runs.training_runs]
    run = rest.get_training_run(tc.model_id).result(timeout=30)
    assert run.base_model == TINY_MODEL and run.lora_rank == 8 and run.last_checkpoint is not None
    listed = rest.list_checkpoints(tc.model_id).result(timeout=30).checkpoints
    assert {c.checkpoint_id for c in listed} == {"weights/keep", "weights/drop", "sampler_weights/for-sampling"}
    rest.delete_checkpoint_from_tinker_path(drop).result(timeout=30)
    assert {c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result(timeout=30).checkpoints} == {
        "weights/keep",
        "sampler_weights/for-sampling",
    }
    assert keep in [c.tinker_path for c in rest.list_user_checkpoints(limit=100).result(timeout=30).checkpoints]
    rest.publish_checkpoint_from_tinker_path(keep).result(timeout=30)
    assert [
        c.public for c in rest.list_checkpoints(tc.model_id).result(timeout=30).checkpoints if c.tinker_path == keep
    ] == [True]
    rest.unpublish_checkpoint_from_tinker_path(keep).result(timeout=30)
    info = rest.get_weights_info_by_tinker_path(keep).result(timeout=30)
    assert info.base_model == TINY_MODEL and info.lora_rank == 8
    session = rest.get_session(service.holder.get_session_id()).result(timeout=30)
    assert tc.model_id in session.training_run_ids

    env = {**os.environ, "TINKER_BASE_URL": stack.url, "TINKER_API_KEY": KEY, "TINKER_TELEMETRY": "0"}
    cli = [sys.executable, "-m", "tinker.cli", "--format", "json", "checkpoint"]
    listing = subprocess.run(
        [*cli, "list", "--run-id", tc.model_id], env=env, check=False, capture_output=True, text=True, timeout=120
    )
    assert listing.returncode == 0, listing.stderr
    assert keep in listing.stdout
    runs = subprocess.run(
        [sys.executable, "-m", "tinker.cli", "--format", "json", "run", "list"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert runs.returncode == 0 and tc.model_id in runs.stdout, runs.stderr
    download = subprocess.run(
        [*cli, "download", keep, "--output", str(tmp_path)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert download.returncode == 0, download.stdout + download.stderr
    files = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files, files
    # the temporary export the CLI made is deleted again
    assert not [
        c
        for c in rest.list_user_checkpoints(limit=1000).result(timeout=30).checkpoints
        if c.checkpoint_type == "external"
    ]


def test_external_weights_links_are_signed_and_expire(stack, service):
    tc = new_client(service, seed=6)
    path = tc.save_weights_external("export").result(timeout=60).path
    assert "/external_weights/export" in path
    urls = service.create_rest_client().get_external_weights_urls(path).result(timeout=30)
    url = urls.urls["adapter_model.safetensors"]
    assert requests.get(url, timeout=10).content[:8]  # no API key needed
    assert requests.get(url.replace("sig=", "sig=0"), timeout=10).status_code == 403


def test_a_checkpoint_past_its_ttl_is_deleted_files_and_record_and_no_longer_downloadable(stack, service):
    import time
    from pathlib import Path

    tc = new_client(service, seed=7)
    path = tc.save_weights_external("shortlived").result(timeout=60).path
    rest = service.create_rest_client()
    url = rest.get_external_weights_urls(path).result(timeout=30).urls["adapter_model.safetensors"]
    assert requests.get(url, timeout=10).status_code == 200
    record = stack.registry().checkpoint(tc.model_id, "external_weights/shortlived")
    directory = Path(record["dir"])
    assert directory.is_dir()
    rest.set_checkpoint_ttl_from_tinker_path(path, 1).result(timeout=30)
    deadline = time.monotonic() + 60  # a worker's heartbeat (1 s here) sweeps expired checkpoints
    while directory.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not directory.exists(), "the expired checkpoint's files were never deleted"
    assert stack.registry().checkpoint(tc.model_id, "external_weights/shortlived") is None
    assert requests.get(url, timeout=10).status_code == 404
    listed = rest.list_checkpoints(tc.model_id).result(timeout=30).checkpoints
    assert "external_weights/shortlived" not in [c.checkpoint_id for c in listed]


def test_copy_weights_makes_an_independent_untrainable_copy_and_a_resend_answers_the_same_copy(stack, service):
    tc = new_client(service, seed=8)
    tc.forward_backward([make_datum(31)], "cross_entropy").result(timeout=60)
    tc.optim_step(ADAM).result(timeout=60)
    source = tc.save_weights_for_sampler("to-copy").result(timeout=60).path
    tokens = tinker.ModelInput.from_ints([3, 14, 15, 92, 65, 35])
    want = service.create_sampling_client(model_path=source).compute_logprobs(tokens).result(timeout=60)[1:]
    rest = tinker.RestClient(base_url=stack.url, api_key=KEY)
    copy = rest.copy_weights(source, "proj-archive").result(timeout=60)
    assert copy.startswith("tinker://copy-") and copy.endswith("/sampler_weights/to-copy") and copy != source
    rest.delete_checkpoint_from_tinker_path(source).result(timeout=30)  # the copy's files are its own (hard links)
    got = service.create_sampling_client(model_path=copy).compute_logprobs(tokens).result(timeout=60)[1:]
    np.testing.assert_allclose(got, want, atol=1e-6)

    headers = {"X-API-Key": KEY, "X-Idempotency-Key": "copy-once"}
    body = {"source_path": copy, "destination_project_id": "p"}
    first = requests.post(f"{stack.url}/api/v1/copy_weights", json=body, headers=headers, timeout=30).json()
    again = requests.post(f"{stack.url}/api/v1/copy_weights", json=body, headers=headers, timeout=30).json()
    assert first["tinker_path"] == again["tinker_path"] != copy
    missing = requests.post(
        f"{stack.url}/api/v1/copy_weights", json={"source_path": source}, headers={"X-API-Key": KEY}, timeout=30
    )
    assert missing.status_code == 404
    run_id = copy.removeprefix("tinker://").split("/")[0]
    fwd = requests.post(
        f"{stack.url}/api/v1/forward",
        json={"model_id": run_id, "seq_id": 1, "forward_input": {"data": [], "loss_fn": "cross_entropy"}},
        headers={"X-API-Key": KEY},
        timeout=30,
    )
    assert fwd.status_code in (400, 404), fwd.text  # a copy's run holds a checkpoint, not an adapter to train


def _proto_fwdbwd(model_id: str, seq_id: int, datum: tinker.Datum) -> bytes:
    from tinker.proto.request_conv import forward_backward_request_to_proto

    request = types.ForwardBackwardRequest(
        model_id=model_id,
        seq_id=seq_id,
        forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"),
    )
    return zstandard.ZstdCompressor().compress(forward_backward_request_to_proto(request).SerializeToString())


def test_chunks_sent_out_of_order_run_in_seq_order_and_resends_apply_once(stack, service):
    tc = new_client(service, seed=7)
    headers = {"X-API-Key": KEY, "Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"}
    post = lambda seq, d: requests.post(
        stack.url + "/api/v1/forward_backward", data=_proto_fwdbwd(tc.model_id, seq, d), headers=headers, timeout=10
    )
    second = post(2, make_datum(51)).json()["request_id"]  # the SDK sends chunks first-chunk-last
    first = post(1, make_datum(50)).json()["request_id"]
    assert post(1, make_datum(50)).json()["request_id"] == first
    results = []
    for request_id in (first, second):
        answer = requests.post(
            stack.url + "/api/v1/retrieve_future",
            json={"request_id": request_id},
            headers={"X-API-Key": KEY, "Accept": "application/x-protobuf"},
            timeout=60,
        )
        assert answer.headers["Content-Type"].startswith("application/x-protobuf")
        out = pb.ForwardBackwardOutput()
        out.ParseFromString(answer.content)
        assert all(k.count(":") == 1 for k in out.metrics)
        results.append(out.metrics["loss:sum"])
    twin = new_client(service, seed=7)  # same seed, no optim_step anywhere: the same weights
    both = twin.forward([make_datum(50), make_datum(51)], "cross_entropy").result(timeout=60)
    assert sum(results) == pytest.approx(both.metrics["loss:sum"], rel=1e-5)


BAD = [
    (
        "token out of range",
        lambda: [
            tinker.Datum(
                model_input=tinker.ModelInput.from_ints([1, 2, 10**7]),
                loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
            )
        ],
        "cross_entropy",
        "model_input",
    ),
    ("unknown loss", lambda: [make_datum(1)], "no_such_loss", "loss_fn"),
    (
        "length mismatch",
        lambda: [
            tinker.Datum(
                model_input=tinker.ModelInput.from_ints([1, 2, 3]),
                loss_fn_inputs={"target_tokens": [2, 3], "weights": [1.0, 1.0]},
            )
        ],
        "cross_entropy",
        "differs from model_input length",
    ),
]


@pytest.fixture(scope="module")
def bad_input_client(service) -> tinker.TrainingClient:
    return new_client(service, seed=8, rank=4)


@pytest.mark.parametrize("case,data,loss_fn,field", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_the_sdk_error_with_our_message(bad_input_client, case, data, loss_fn, field):
    with pytest.raises((tinker.TinkerError, ValueError)) as info:
        bad_input_client.forward_backward(data(), loss_fn).result(timeout=60)
    assert field in str(info.value), str(info.value)
    assert (
        bad_input_client.forward_backward([make_datum(2)], "cross_entropy").result(timeout=60).metrics["loss:sum"] > 0
    )


def test_unknown_base_model_is_a_bad_request_naming_base_model(service):
    with pytest.raises(tinker.BadRequestError) as info:  # a 400: the SDK does not retry it
        service.create_lora_training_client("nobody/nothing", rank=4).result(timeout=60)
    assert "base_model" in str(info.value)


def test_unknown_model_and_future_are_not_found(stack, service):
    rest = service.create_rest_client()
    with pytest.raises(tinker.NotFoundError):
        rest.get_training_run(f"{uuid.uuid4()}:train:0").result(timeout=30)
    answer = requests.post(
        stack.url + "/api/v1/retrieve_future",
        json={"request_id": str(uuid.uuid4())},
        headers={"X-API-Key": KEY},
        timeout=10,
    )
    assert answer.status_code == 404 and "request_id" in answer.json()["error"]
    bare = requests.post(
        stack.url + "/api/v1/create_model",
        data=b"",
        headers={"X-API-Key": KEY, "Content-Type": "application/json"},
        timeout=10,
    )
    assert bare.status_code == 400 and bare.content


def test_bootstrap_flags_and_capabilities(stack, service):
    config = requests.post(
        stack.url + "/api/v1/client/config",
        json={"sdk_version": tinker.__version__},
        headers={"X-API-Key": KEY},
        timeout=10,
    ).json()
    parsed = types.ClientConfigResponse.model_validate(config)
    assert parsed.proto_compress_fwdbwd and not parsed.pjwt_auth_enabled and not parsed.sample_use_retrieve_futures
    capabilities = service.get_server_capabilities()
    assert TINY_MODEL in [m.model_name for m in capabilities.supported_models]
    assert json.loads(json.dumps(config)) == config


def test_example_script_runs_with_the_documented_tokenizer_install(stack, tmp_path):
    root = Path(__file__).resolve().parent.parent
    env = {
        **stack.env,
        "HF_HOME": str(tmp_path / "hf"),
        "TINKER_BASE_URL": stack.url,
        "TINKER_API_KEY": KEY,
        "TINKER_TELEMETRY": "0",
    }
    install = subprocess.run(
        [sys.executable, "-m", "backends.models", "install-tokenizer", "--model", TINY_MODEL],
        cwd=root,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    env.update(TINKERBELL_EXAMPLE_MODEL=TINY_MODEL, TINKERBELL_EXAMPLE_STEPS="3")
    run = subprocess.run(
        [sys.executable, str(root / "examples" / "tinker_sdk_example.py")],
        cwd=tmp_path,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "step 2: loss" in run.stdout and "sample:" in run.stdout


def test_resent_create_model_answers_with_the_same_future(stack, service):
    headers = {"X-API-Key": KEY}
    session_id = requests.post(
        stack.url + "/api/v1/create_session",
        json={"tags": [], "user_metadata": {}, "sdk_version": "0.38.0", "type": "create_session"},
        headers=headers,
        timeout=10,
    ).json()["session_id"]
    create = {
        "session_id": session_id,
        "model_seq_id": 0,
        "base_model": TINY_MODEL,
        "lora_config": {"rank": 4},
        "type": "create_model",
    }
    first = requests.post(stack.url + "/api/v1/create_model", json=create, headers=headers, timeout=10)
    again = requests.post(stack.url + "/api/v1/create_model", json=create, headers=headers, timeout=10)
    assert first.status_code == again.status_code == 200
    assert first.json()["request_id"] == again.json()["request_id"]
    different = requests.post(
        stack.url + "/api/v1/create_model", json={**create, "lora_config": {"rank": 8}}, headers=headers, timeout=10
    )
    assert different.status_code == 400 and "model_seq_id" in different.json()["error"]


def test_ephemeral_sampler_snapshots_are_pruned_to_the_newest_few(stack, service):
    tc = new_client(service, seed=8)
    samplers = [tc.save_weights_and_get_sampling_client().result(timeout=60) for _ in range(10)]
    kept = sorted((stack.data_dir / "checkpoints" / tc.model_id / "sampler_weights").iterdir())
    assert len(kept) == 8  # TINKERBELL_EPHEMERAL_KEEP default
    prompt = tinker.ModelInput.from_ints([1, 2, 3])
    result = samplers[-1].sample(prompt, 1, types.SamplingParams(max_tokens=2, temperature=0.0)).result(timeout=60)
    assert len(result.sequences[0].tokens) >= 1
    with pytest.raises(tinker.RequestFailedError, match="model_path"):
        samplers[0].sample(prompt, 1, types.SamplingParams(max_tokens=2, temperature=0.0)).result(timeout=60)
