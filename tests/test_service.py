"""The training service end to end: HTTP → Redis → Celery worker → HF+PEFT backend, checked against plain PEFT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client import NotFoundError, TinkerbellClient, UserInputError
from tests.stackutil import TINY_MODEL

ADAM = {"learning_rate": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.01}


def make_datum(seed: int, length: int = 12, vocab: int = 2000) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=length + 1)
    weights = np.ones(length, dtype=np.float32)
    weights[: length // 3] = 0.0  # a prompt part that does not count
    return {
        "model_input": tokens[:-1].tolist(),
        "loss_fn_inputs": {"target_tokens": tokens[1:].tolist(), "weights": weights.tolist()},
    }


def logprobs_of(output: dict) -> np.ndarray:
    return np.asarray(output["logprobs"]["data"], dtype=np.float32).reshape(output["logprobs"]["shape"])


@pytest.fixture(scope="module")
def tb(stack) -> TinkerbellClient:
    return TinkerbellClient(stack.url, api_key="tml-test")


def checkpoint_dir(stack, path: str) -> str:
    model_id, kind, name = path[len("tinker://") :].split("/")
    return str(stack.data_dir / "checkpoints" / model_id / kind / name)


def plain_peft(models_dir, adapter_dir: str):
    """The in-process reference: transformers + PEFT, no Tinkerbell code."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(models_dir / TINY_MODEL, torch_dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)


def plain_logprobs(model, datum: dict) -> torch.Tensor:
    tokens = torch.tensor([datum["model_input"]])
    targets = torch.tensor(datum["loss_fn_inputs"]["target_tokens"])
    logits = model(input_ids=tokens).logits[0].float()  # (N, V)
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]  # (N,)


def test_loss_and_logprobs_equal_plain_peft(stack, tb, models_dir):
    model_id = tb.add_lora(rank=4, seed=3).result(120)["model_id"]
    batch = [make_datum(1), make_datum(2, length=7)]
    # One step first so LoRA B is non-zero and the adapter really shapes the logprobs.
    tb.forward_backward(model_id, batch).result(60)
    tb.optim_step(model_id, **ADAM).result(60)
    before = tb.save_state(model_id, "before").result(60)["path"]

    out = tb.forward_backward(model_id, batch).result(60)

    model = plain_peft(models_dir, checkpoint_dir(stack, before))
    loss = torch.zeros(())
    for datum, output in zip(batch, out["loss_fn_outputs"]):
        lp = plain_logprobs(model, datum)
        np.testing.assert_allclose(logprobs_of(output), lp.detach().numpy(), atol=1e-5)
        loss = loss + (-lp * torch.tensor(datum["loss_fn_inputs"]["weights"])).sum()
    assert out["metrics"]["loss:sum"] == pytest.approx(
        loss.item(), rel=1e-6
    )  # a float32 sum of ~100: 1e-5 absolute is below its ulp


def test_one_optim_step_equals_in_process_adamw(stack, tb, models_dir):
    """Adam's first step is lr*g/(|g|+eps): it amplifies float32 rounding in small gradients by up to lr/eps,
    so the reference computes logprobs with the same formula (log_softmax, then gather) as the service."""
    from safetensors.torch import load_file

    adam = ADAM

    model_id = tb.add_lora(rank=4, seed=5).result(120)["model_id"]
    start = tb.save_state(model_id, "start", for_sampler=True).result(60)["path"]
    batch = [make_datum(10), make_datum(11)]
    tb.forward_backward(model_id, batch).result(60)
    tb.optim_step(model_id, **adam).result(60)
    end = tb.save_state(model_id, "end", for_sampler=True).result(60)["path"]

    model = plain_peft(models_dir, checkpoint_dir(stack, start))
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(
        list(named.values()),
        lr=adam["learning_rate"],
        betas=(adam["beta1"], adam["beta2"]),
        eps=adam["eps"],
        weight_decay=adam["weight_decay"],
    )
    # One batched forward, as the service runs it (both datums have the same length: no padding).
    tokens = torch.tensor([d["model_input"] for d in batch])  # (B, N)
    targets = torch.tensor([d["loss_fn_inputs"]["target_tokens"] for d in batch])  # (B, N)
    weights = torch.tensor([d["loss_fn_inputs"]["weights"] for d in batch])  # (B, N)
    logits = model(input_ids=tokens).logits.float()  # (B, N, V)
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]  # (B, N)
    (-(logprobs * weights)).sum().backward()
    optimizer.step()

    saved = load_file(f"{checkpoint_dir(stack, end)}/adapter_model.safetensors")
    assert saved, "adapter checkpoint is empty"
    compared = 0
    for name, param in named.items():
        key = name.replace(".default", "")
        assert key in saved, f"{key} missing from the saved adapter"
        np.testing.assert_allclose(saved[key].numpy(), param.detach().numpy(), atol=1e-6)
        compared += 1
    assert compared == len(saved)


def test_thirty_sft_steps_halve_the_loss(tb):
    model_id = tb.add_lora(rank=8, seed=0).result(120)["model_id"]
    batch = [make_datum(s, length=10, vocab=300) for s in range(4)]
    losses = []
    for _ in range(30):
        losses.append(tb.forward_backward(model_id, batch).result(60)["metrics"]["loss:sum"])
        tb.optim_step(model_id, learning_rate=2e-2).result(60)
    assert losses[-1] < 0.5 * losses[0], losses


def _train(tb, model_id, batches, steps):
    out = []
    for step in range(steps):
        out.append(tb.forward_backward(model_id, batches[step % len(batches)]))
        out.append(tb.optim_step(model_id, learning_rate=1e-2))
    return out


def test_two_adapters_interleaved_each_equal_training_alone(tb):
    data_a = [[make_datum(20)], [make_datum(21)]]
    data_b = [[make_datum(30, length=5)], [make_datum(31, length=9)]]
    a = tb.add_lora(rank=4, seed=1).result(120)["model_id"]
    b = tb.add_lora(rank=4, seed=2).result(120)["model_id"]
    for step in range(4):  # interleave: a, b, a, b … each with its own data and optimizer
        for model_id, data in ((a, data_a), (b, data_b)):
            tb.forward_backward(model_id, data[step % 2]).result(60)
            tb.optim_step(model_id, learning_rate=1e-2).result(60)
    probe_a, probe_b = data_a[0], data_b[0]
    got_a = logprobs_of(tb.forward(a, probe_a).result(60)["loss_fn_outputs"][0])
    got_b = logprobs_of(tb.forward(b, probe_b).result(60)["loss_fn_outputs"][0])

    alone_a = tb.add_lora(rank=4, seed=1).result(120)["model_id"]
    for step in range(4):
        tb.forward_backward(alone_a, data_a[step % 2]).result(60)
        tb.optim_step(alone_a, learning_rate=1e-2).result(60)
    alone_b = tb.add_lora(rank=4, seed=2).result(120)["model_id"]
    for step in range(4):
        tb.forward_backward(alone_b, data_b[step % 2]).result(60)
        tb.optim_step(alone_b, learning_rate=1e-2).result(60)
    np.testing.assert_allclose(
        got_a, logprobs_of(tb.forward(alone_a, probe_a).result(60)["loss_fn_outputs"][0]), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        got_b, logprobs_of(tb.forward(alone_b, probe_b).result(60)["loss_fn_outputs"][0]), rtol=1e-6, atol=1e-6
    )


def test_gradient_accumulation_equals_full_batch(tb):
    batch = [make_datum(s) for s in (40, 41, 42, 43)]
    split = tb.add_lora(rank=4, seed=9).result(120)["model_id"]
    tb.forward_backward(split, batch[:2]).result(60)
    tb.forward_backward(split, batch[2:]).result(60)
    tb.optim_step(split, learning_rate=1e-2).result(60)
    full = tb.add_lora(rank=4, seed=9).result(120)["model_id"]
    tb.forward_backward(full, batch).result(60)
    tb.optim_step(full, learning_rate=1e-2).result(60)
    got = tb.forward(split, batch).result(60)["loss_fn_outputs"]
    want = tb.forward(full, batch).result(60)["loss_fn_outputs"]
    for g, w in zip(got, want):
        np.testing.assert_allclose(logprobs_of(g), logprobs_of(w), rtol=1e-6, atol=1e-6)


def test_sample_greedy_is_deterministic_and_seeded_sampling_repeats(tb):
    prompt = make_datum(50)["model_input"]
    greedy = [tb.sample(prompt, max_tokens=6, temperature=0.0).result(60)["sequences"][0]["tokens"] for _ in range(2)]
    assert greedy[0] == greedy[1] and len(greedy[0]) == 6
    seeded = [tb.sample(prompt, max_tokens=6, temperature=1.0, seed=7, num_samples=3).result(60) for _ in range(2)]
    assert [s["tokens"] for s in seeded[0]["sequences"]] == [s["tokens"] for s in seeded[1]["sequences"]]
    assert len(seeded[0]["sequences"]) == 3
    seq = seeded[0]["sequences"][0]
    assert len(seq["logprobs"]) == len(seq["tokens"]) and all(lp <= 0 for lp in seq["logprobs"])
    assert seq["stop_reason"] in ("length", "stop")


def test_sample_from_saved_adapter_weights(tb):
    model_id = tb.add_lora(rank=4, seed=4).result(120)["model_id"]
    datum = make_datum(60, length=8, vocab=50)
    for _ in range(30):
        tb.forward_backward(model_id, [datum]).result(60)
        tb.optim_step(model_id, learning_rate=1e-2).result(60)
    path = tb.save_state(model_id, "s", for_sampler=True).result(60)["path"]
    prompt = datum["model_input"][:3]
    tuned = tb.sample(prompt, model_path=path, max_tokens=3, temperature=0.0, stop=[]).result(60)["sequences"][0][
        "tokens"
    ]
    assert tuned == datum["loss_fn_inputs"]["target_tokens"][2:5]  # it learned to continue the example


def test_remove_adapter_frees_it(stack, tb):
    model_id = tb.add_lora(rank=4).result(120)["model_id"]
    tb.remove_lora(model_id).result(60)
    with pytest.raises(NotFoundError):
        tb.forward_backward(model_id, [make_datum(1)])
    assert model_id not in stack.registry().worker_adapters("w0")


BAD_INPUTS = [
    ("unknown model", "/fwdbwd", {"model_id": "nope:train:0", "data": [make_datum(1)]}, "model_id"),
    ("unknown loss", "/fwdbwd", {"data": [make_datum(1)], "loss_fn": "no_such_loss"}, "loss_fn"),
    (
        "negative token",
        "/fwdbwd",
        {"data": [{"model_input": [1, -2, 3], "loss_fn_inputs": {"target_tokens": [2, 3, 4], "weights": [1, 1, 1]}}]},
        "model_input",
    ),
    (
        "length mismatch",
        "/fwdbwd",
        {"data": [{"model_input": [1, 2, 3], "loss_fn_inputs": {"target_tokens": [2, 3], "weights": [1, 1]}}]},
        "target_tokens",
    ),
    (
        "weights mismatch",
        "/fwdbwd",
        {"data": [{"model_input": [1, 2, 3], "loss_fn_inputs": {"target_tokens": [2, 3, 4], "weights": [1, 1]}}]},
        "weights",
    ),
    ("empty batch", "/fwdbwd", {"data": []}, "data"),
    ("bad learning rate", "/optim_step", {"adam_params": {"learning_rate": 0.0}}, "learning_rate"),
    ("unknown base model", "/add_lora", {"base_model": "nobody/nothing"}, "base_model"),
]


@pytest.mark.parametrize("case,route,payload,field", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_clear_4xx_naming_the_field(stack, tb, case, route, payload, field):
    import requests

    model_id = tb.add_lora(rank=4).result(120)["model_id"]
    payload = {"model_id": model_id, **payload}
    response = requests.post(stack.url + route, json=payload, headers={"X-API-Key": "tml-test"}, timeout=30)
    assert 400 <= response.status_code < 500
    assert field in response.json()["error"]
    assert response.json()["category"] == "user"
    assert tb.forward_backward(model_id, [make_datum(2)]).result(60)["metrics"]["loss:sum"] > 0


def test_malformed_json_is_a_400_with_a_body(stack):
    import requests

    response = requests.post(
        stack.url + "/fwdbwd",
        data="{not json",
        headers={"X-API-Key": "tml-test", "Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 400 and "JSON" in response.json()["error"]


def test_one_keep_alive_connection_serves_pipelined_back_to_back_and_idle_requests(stack):
    """gunicorn's gthread worker on a kept-alive connection: whether requests come pipelined in one write, right
    after each other or after the connection went back to the poller, each is answered once and in order on the
    same connection."""
    import socket
    import time

    host, port = stack.url.removeprefix("http://").split(":")

    def request(path: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()

    def read_response(reader) -> tuple[int, bytes]:
        status = int(reader.readline().split()[1])
        length = 0
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, reader.read(length)

    with socket.create_connection((host, int(port)), timeout=10) as sock, sock.makefile("rb") as reader:
        sock.sendall(request("/healthz") + request("/no-such-route") + request("/healthz"))  # pipelined
        answers = [read_response(reader) for _ in range(3)]
        assert [status for status, _ in answers] == [200, 404, 200] and b'"status":"ok"' in answers[0][1]
        for pause in (0.0, 0.0005, 0.05, 0.3):  # within the thread's wait, and long after it
            time.sleep(pause)
            sock.sendall(request("/healthz"))
            assert read_response(reader)[0] == 200


def test_token_out_of_vocab_fails_the_future_as_user_error_and_worker_goes_on(tb):
    model_id = tb.add_lora(rank=4).result(120)["model_id"]
    bad = {"model_input": [1, 2, 10**7], "loss_fn_inputs": {"target_tokens": [2, 3, 4], "weights": [1, 1, 1]}}
    with pytest.raises(UserInputError) as info:
        tb.forward_backward(model_id, [bad]).result(60)
    assert "model_input" in str(info.value) and info.value.category == "user"
    assert tb.forward_backward(model_id, [make_datum(3)]).result(60)["metrics"]["loss:sum"] > 0


def test_resent_seq_id_applies_once(stack, tb):
    import requests

    model_id = tb.add_lora(rank=4, seed=1).result(120)["model_id"]
    headers = {"X-API-Key": "tml-test"}
    body = {"model_id": model_id, "seq_id": 1, "data": [make_datum(70)]}
    first = requests.post(stack.url + "/fwdbwd", json=body, headers=headers, timeout=10).json()["request_id"]
    again = requests.post(stack.url + "/fwdbwd", json=body, headers=headers, timeout=10).json()["request_id"]
    assert first == again
    # seq 3 arrives before seq 2: it waits for 2, then both run in order.
    third = requests.post(
        stack.url + "/fwdbwd", json={**body, "seq_id": 3, "forward_only": True}, headers=headers, timeout=10
    ).json()["request_id"]
    second = requests.post(
        stack.url + "/optim_step",
        json={"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.05}},
        headers=headers,
        timeout=10,
    ).json()["request_id"]
    loss_before = tb.retrieve_future(first).result(60)["metrics"]["loss:sum"]
    tb.retrieve_future(second).result(60)
    loss_after = tb.retrieve_future(third).result(60)["metrics"]["loss:sum"]
    assert loss_after < loss_before  # seq 3 saw the step of seq 2


def test_requests_held_behind_a_seq_id_that_never_comes_run_after_the_gap_timeout(make_stack):
    import requests

    gappy = make_stack(
        1, {"TINKERBELL_AUTH": "off", "TINKERBELL_SEQ_GAP_TIMEOUT_S": "1", "TINKERBELL_POLL_TIMEOUT_S": "1"}
    )
    tb = TinkerbellClient(gappy.url, api_key="tml-test")
    model_id = tb.add_lora(rank=4).result(120)["model_id"]
    headers = {"X-API-Key": "tml-test"}
    held = requests.post(
        gappy.url + "/fwdbwd",
        json={"model_id": model_id, "seq_id": 2, "data": [make_datum(1)]},
        headers=headers,
        timeout=10,
    ).json()["request_id"]
    assert (
        tb.retrieve_future(held).result(30)["metrics"]["loss:sum"] > 0
    )  # seq 1 never came: seq 2 ran after the timeout
    late = requests.post(
        gappy.url + "/fwdbwd",
        json={"model_id": model_id, "seq_id": 1, "data": [make_datum(1)]},
        headers=headers,
        timeout=10,
    )
    assert late.status_code == 400 and "seq_id 1" in late.json()["error"]
    after = requests.post(
        gappy.url + "/fwdbwd",
        json={"model_id": model_id, "seq_id": 3, "data": [make_datum(2)]},
        headers=headers,
        timeout=10,
    ).json()["request_id"]
    assert tb.retrieve_future(after).result(30)["metrics"]["loss:sum"] > 0  # the model goes on
