"""Custom losses end to end: upload with @custom_loss, run by name on a real worker, safety and isolation.

One stack (auth on, TINKERBELL_ALLOW_CUSTOM_CODE=1, a 2 s limit) for the module; an API-only stack without it.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client import (
    AuthError,
    Future,
    LossFnOutput,
    NotFoundError,
    TinkerbellClient,
    UserInputError,
    custom_loss,
)
from losses import pad_batch
from tests.test_service import (
    ADAM,
    checkpoint_dir,
    logprobs_of,
    make_datum,
    plain_logprobs,
    plain_peft,
)

LIMIT_S = 2.0
# Adam's eps 1e-8 turns float rounding in near-zero gradients (rare vocabulary rows) into whole lr-sized steps;
# eps 1e-3 keeps the update proportional to such gradients, so comparing updates compares gradients.
DPO_ADAM = {**ADAM, "eps": 1e-3}


def dpo_loss(model_outputs, loss_fn_inputs, attention_mask, beta=0.1):
    """DPO: datums come in (chosen, rejected) pairs; ref_logprobs are the reference model's per-token logprobs."""
    weights = loss_fn_inputs["weights"] * attention_mask  # (B, T): response tokens only
    policy = (model_outputs["logprobs"] * weights).sum(-1)  # (B,)
    reference = (loss_fn_inputs["ref_logprobs"] * weights).sum(-1)  # (B,)
    ratio = (policy - reference).view(-1, 2)  # (P, 2): chosen, rejected
    logits = beta * (ratio[:, 0] - ratio[:, 1])  # (P,)
    loss = -F.logsigmoid(logits).sum()
    return LossFnOutput(
        loss=loss, diagnostics={"accuracy:mean": (logits > 0).float().mean(), "margin:mean": logits.mean() / beta}
    )


def _weighted_nll(logprobs, weights):
    """A module-level helper: travels by value with the loss that uses it."""
    return -(logprobs * weights).sum()


def scaled_nll(scale: float):
    def loss(model_outputs, loss_fn_inputs, attention_mask):
        nll = _weighted_nll(model_outputs["logprobs"], loss_fn_inputs["weights"] * attention_mask)
        return LossFnOutput(loss=scale * nll, diagnostics={"scale:mean": scale})

    return loss


def versioned(version: float):
    def loss(model_outputs, loss_fn_inputs, attention_mask):
        return LossFnOutput(
            loss=-(model_outputs["logprobs"] * attention_mask).sum(), diagnostics={"version:mean": version}
        )

    return loss


def sleeps(seconds: float):
    def loss(model_outputs, loss_fn_inputs, attention_mask):
        time.sleep(seconds)
        return LossFnOutput(loss=-model_outputs["logprobs"].sum())

    return loss


def raises(model_outputs, loss_fn_inputs, attention_mask):
    scores = model_outputs["logprobs"].sum()
    raise ValueError(f"boom at {scores.shape}")


def nan_loss(model_outputs, loss_fn_inputs, attention_mask):
    return LossFnOutput(loss=model_outputs["logprobs"].sum() * float("nan"))


def per_token_loss(model_outputs, loss_fn_inputs, attention_mask):
    return LossFnOutput(loss=-model_outputs["logprobs"] * attention_mask)  # (B, T): forgot to reduce


def stubborn_sleeper(model_outputs, loss_fn_inputs, attention_mask):
    """Swallows every Exception and sleeps on: the limit must still stop it."""
    for _ in range(100):
        try:
            time.sleep(1.0)
        except Exception:  # noqa: BLE001, S112 -- the point of the test
            continue
    return LossFnOutput(loss=-model_outputs["logprobs"].sum())


@pytest.fixture(scope="module")
def custom_stack(make_stack):
    return make_stack(1, {"TINKERBELL_ALLOW_CUSTOM_CODE": "1", "TINKERBELL_CUSTOM_LOSS_TIMEOUT_S": str(LIMIT_S)})


@pytest.fixture(scope="module")
def keys(custom_stack) -> dict[str, str]:
    registry = custom_stack.registry()
    return {
        "alice": registry.create_key("alice", ["custom_code"]),
        "bob": registry.create_key("bob", ["custom_code"]),
        "carol": registry.create_key("carol"),
    }


@pytest.fixture(scope="module")
def alice(custom_stack, keys) -> TinkerbellClient:
    return TinkerbellClient(custom_stack.url, api_key=keys["alice"])


def dpo_batch(seeds: list[int]) -> list[dict]:
    return [make_datum(s, length=10) for s in seeds]


def test_dpo_through_the_decorator_equals_dpo_in_process(custom_stack, alice, models_dir):
    from safetensors.torch import load_file

    uploaded = custom_loss(alice, name="test_dpo")(dpo_loss)
    assert uploaded is dpo_loss  # unchanged, still callable here
    listed = {c["name"]: c for c in alice.list_loss_functions()["loss_functions"]}
    assert listed["test_dpo"]["custom"] and listed["test_dpo"]["version"] == 1
    assert listed["test_dpo"]["signature"] == "test_dpo(model_outputs, loss_fn_inputs, attention_mask, beta=0.1)"
    assert listed["test_dpo"]["docstring"].startswith("DPO: datums come in (chosen, rejected) pairs")

    model_id = alice.add_lora(rank=4, seed=3).result(120)["model_id"]
    batch = dpo_batch([101, 102, 103, 104])  # pairs (101, 102), (103, 104)
    reference = [logprobs_of(o) for o in alice.forward(model_id, batch).result(60)["loss_fn_outputs"]]
    alice.forward_backward(model_id, batch).result(60)  # move the policy away from the reference
    alice.optim_step(model_id, **ADAM).result(60)
    start = alice.save_state(model_id, "start", for_sampler=True).result(60)["path"]
    alice.load_state(model_id, start, optimizer=False).result(60)  # a fresh AdamW, like the in-process one
    for datum, ref in zip(batch, reference):
        datum["loss_fn_inputs"]["ref_logprobs"] = ref.tolist()

    out = alice.forward_backward(model_id, batch, loss_fn="test_dpo", loss_fn_config={"beta": 0.5}).result(60)
    alice.optim_step(model_id, **DPO_ADAM).result(60)
    end = alice.save_state(model_id, "end", for_sampler=True).result(60)["path"]

    model = plain_peft(models_dir, checkpoint_dir(custom_stack, start))
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(
        list(named.values()),
        lr=DPO_ADAM["learning_rate"],
        betas=(DPO_ADAM["beta1"], DPO_ADAM["beta2"]),
        eps=DPO_ADAM["eps"],
        weight_decay=DPO_ADAM["weight_decay"],
    )
    logprobs, mask = pad_batch([plain_logprobs(model, d) for d in batch])  # (B, T), (B, T)
    inputs = {
        k: pad_batch([torch.tensor(d["loss_fn_inputs"][k]) for d in batch])[0]
        for k in ("target_tokens", "weights", "ref_logprobs")
    }
    expected = dpo_loss({"logprobs": logprobs, "target_tokens": inputs["target_tokens"]}, inputs, mask, beta=0.5)
    expected.loss.backward()
    optimizer.step()

    assert out["metrics"]["loss:sum"] == pytest.approx(expected.loss.item(), rel=1e-5, abs=1e-6)
    assert out["metrics"]["accuracy:mean"] == pytest.approx(float(expected.diagnostics["accuracy:mean"]))
    assert out["metrics"]["margin:mean"] == pytest.approx(
        expected.diagnostics["margin:mean"].item(), rel=1e-4, abs=1e-6
    )
    saved = load_file(f"{checkpoint_dir(custom_stack, end)}/adapter_model.safetensors")
    for name, param in named.items():
        np.testing.assert_allclose(saved[name.replace(".default", "")].numpy(), param.detach().numpy(), atol=1e-5)
    assert len(saved) == len(named)


def test_a_helper_and_a_closure_travel_to_a_worker_that_never_saw_the_client(alice):
    from client.custom_loss import serialize_loss

    body = serialize_loss(scaled_nll(3.0), "scaled_nll")
    assert b"tests.test_custom_loss" not in __import__("base64").b64decode(body["code"])  # by value, not an import
    alice.register_custom_loss(scaled_nll(3.0), name="scaled_nll")
    model_id = alice.add_lora(rank=4, seed=4).result(120)["model_id"]
    batch = dpo_batch([111, 112])
    want = alice.forward(model_id, batch).result(60)["metrics"]["loss:sum"]  # built-in cross_entropy
    got = alice.forward(model_id, batch, loss_fn="scaled_nll").result(60)["metrics"]
    assert got["loss:sum"] == pytest.approx(3.0 * want, rel=1e-6)
    assert got["scale:mean"] == 3.0


def test_reregistering_changes_the_next_request_not_one_already_queued(alice):
    first = alice.register_custom_loss(versioned(1.0), name="versioned")
    model_id = alice.add_lora(rank=4, seed=5).result(120)["model_id"]
    batch = dpo_batch([121])
    # A seq_id taken now and sent last: every request after it is admitted but held in seq_id order until it comes,
    # so `queued` is certainly waiting (not yet run) when the loss is re-registered.
    gap = alice._next_seq(model_id)
    queued = alice.forward_backward(model_id, batch, loss_fn="versioned")
    second = alice.register_custom_loss(versioned(2.0), name="versioned")
    assert alice._post("/retrieve_future", {"request_id": queued.request_id, "timeout": 0})["type"] == "try_again"
    after = alice.forward_backward(model_id, batch, loss_fn="versioned")
    assert (first["version"], second["version"]) == (1, 2) and first["hash"] != second["hash"]
    filler = alice._post("/fwdbwd", {"model_id": model_id, "seq_id": gap, "data": batch, "loss_fn": "cross_entropy"})
    Future(alice, filler["request_id"]).result(60)
    assert queued.result(60)["metrics"]["version:mean"] == 1.0
    assert after.result(60)["metrics"]["version:mean"] == 2.0
    assert alice.register_custom_loss(versioned(2.0), name="versioned")["unchanged"]  # same code: same version
    assert [v["version"] for v in alice.get_custom_loss("versioned")["versions"]] == [1, 2]


def test_upload_is_refused_when_the_service_does_not_allow_custom_code(make_stack):
    disabled = make_stack(0)  # the API alone: no TINKERBELL_ALLOW_CUSTOM_CODE
    key = disabled.registry().create_key("trusted", ["custom_code"])
    with pytest.raises(AuthError) as info:
        custom_loss(TinkerbellClient(disabled.url, api_key=key), name="nope")(dpo_loss)
    message = str(info.value)
    assert info.value.status == 403
    assert "TINKERBELL_ALLOW_CUSTOM_CODE=1" in message and "python -m api.keys grant KEY_ID custom_code" in message


def test_upload_is_refused_for_a_key_without_the_scope(custom_stack, keys):
    carol = TinkerbellClient(custom_stack.url, api_key=keys["carol"])
    with pytest.raises(AuthError) as info:
        carol.register_custom_loss(dpo_loss, name="carols")
    assert info.value.status == 403 and "custom_code scope" in str(info.value) and "api.keys grant" in str(info.value)
    assert "carols" not in carol.list_loss_functions()["custom"]


def test_another_key_can_neither_list_nor_use_my_loss(custom_stack, keys, alice):
    alice.register_custom_loss(scaled_nll(1.0), name="alices_secret")
    bob = TinkerbellClient(custom_stack.url, api_key=keys["bob"])
    assert "alices_secret" in alice.list_loss_functions()["custom"]
    assert "alices_secret" not in bob.list_loss_functions()["custom"]
    with pytest.raises(NotFoundError):
        bob.get_custom_loss("alices_secret")
    model_id = bob.add_lora(rank=4).result(120)["model_id"]
    with pytest.raises(UserInputError, match="loss_fn"):
        bob.forward_backward(model_id, dpo_batch([131]), loss_fn="alices_secret")
    with pytest.raises(UserInputError, match="loss_id"):
        bob.forward_backward(model_id, dpo_batch([131]), loss_fn="custom", loss_fn_config={"loss_id": "alices_secret"})
    with pytest.raises(NotFoundError):
        bob.delete_custom_loss("alices_secret")


@pytest.fixture(scope="module")
def victim_and_twin(alice) -> tuple[str, str]:
    """Two adapters with the same seed and history; only the victim gets the failing requests."""
    return alice.add_lora(rank=4, seed=7).result(120)["model_id"], alice.add_lora(rank=4, seed=7).result(120)[
        "model_id"
    ]


BAD_LOSSES = [
    ("raises", raises, ["raised ValueError: boom at", "Traceback", "in raises", "scores.shape"]),
    ("nan", nan_loss, ["not finite"]),
    ("non_scalar", per_token_loss, ["scalar"]),
    ("sleeps_past_the_limit", sleeps(30.0), [f"exceeded the {LIMIT_S:g} s limit"]),
    ("swallows_the_interrupt", stubborn_sleeper, [f"exceeded the {LIMIT_S:g} s limit"]),
]


@pytest.mark.parametrize("name,fn,expected", BAD_LOSSES, ids=[c[0] for c in BAD_LOSSES])
def test_a_bad_loss_fails_clearly_and_leaves_the_adapter_untouched(alice, victim_and_twin, name, fn, expected):
    victim, twin = victim_and_twin
    alice.register_custom_loss(fn, name=f"bad_{name}")
    batch = dpo_batch([141, 142])
    before = alice.forward(victim, batch).result(60)["loss_fn_outputs"]
    with pytest.raises(UserInputError) as info:  # the limit's own message, not a stopwatch, shows it stopped the loss
        alice.forward_backward(victim, batch, loss_fn=f"bad_{name}").result(60)
    assert info.value.category == "user"
    for part in expected:
        assert part in str(info.value), str(info.value)
    after = alice.forward(victim, batch).result(60)["loss_fn_outputs"]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(logprobs_of(b), logprobs_of(a))  # weights unchanged
    for model_id in (victim, twin):  # no gradient and no optimizer state left behind by the failure
        assert alice.forward_backward(model_id, batch).result(60)["metrics"]["loss:sum"] > 0
        alice.optim_step(model_id, **ADAM).result(60)
    got, want = (alice.forward(m, batch).result(60)["loss_fn_outputs"] for m in (victim, twin))
    for g, w in zip(got, want):
        np.testing.assert_allclose(logprobs_of(g), logprobs_of(w), atol=1e-6)


def test_a_worker_without_custom_code_enabled_refuses_to_load_it():
    from core.errors import UserError
    from core.settings import Settings
    from tasks.custom_losses import resolve_loss_fn

    spec = {"name": "x", "version": 1, "hash": "0" * 64, "owner": "o"}
    with pytest.raises(UserError, match="TINKERBELL_ALLOW_CUSTOM_CODE=1"):
        resolve_loss_fn("x", spec, Settings(allow_custom_code=False), redis=None)
    assert resolve_loss_fn("cross_entropy", None, Settings(), redis=None) == "cross_entropy"


def test_the_guard_gives_the_same_gradients_as_calling_the_loss_directly():
    from losses import compute_loss, register_loss, unregister_loss
    from tasks.custom_losses import guarded

    weight = torch.randn(5, requires_grad=True)
    targets = [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6, 7]), torch.tensor([1, 1]), torch.tensor([2, 2, 2])]
    inputs = [{"target_tokens": t, "weights": torch.rand(len(t)), "ref_logprobs": -torch.rand(len(t))} for t in targets]
    grads = []
    for fn in (dpo_loss, guarded(dpo_loss, "dpo", 5.0)):
        register_loss("guard_test", fn, custom=True, replace=True)
        weight.grad = None
        logprobs = [-(weight[: len(t)] ** 2) for t in targets]
        loss, metrics = compute_loss("guard_test", logprobs, inputs, {"beta": 0.3})
        loss.backward()
        grads.append((loss.item(), metrics, weight.grad.clone()))
    unregister_loss("guard_test")
    assert grads[0][0] == grads[1][0] and grads[0][1] == grads[1][1]
    torch.testing.assert_close(grads[0][2], grads[1][2], rtol=1e-6, atol=1e-7)
