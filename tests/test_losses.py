"""Losses: hand-checked numbers for every built-in, input validation, metric keys, and the custom-loss contract."""

from __future__ import annotations

import math

import pytest
import torch

from core.errors import UserError
from losses import (
    VALID_REDUCTIONS,
    LossFnOutput,
    call_custom_loss,
    compute_loss,
    get_loss,
    list_losses,
    pad_batch,
    register_loss,
    unregister_loss,
)

LN2 = math.log(2.0)


def f32(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def tokens(*ids: int) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64)


def leaf(*values: float) -> torch.Tensor:
    return f32(*values).requires_grad_(True)


def rl_datum(lp: torch.Tensor, ratios: list[float], advantages: list[float]) -> dict[str, torch.Tensor]:
    """Sampler logprobs chosen so that exp(lp - slp) equals `ratios` exactly (up to float rounding)."""
    slp = lp.detach() - torch.log(torch.tensor(ratios, dtype=torch.float32))
    return {"target_tokens": tokens(*range(len(ratios))), "logprobs": slp, "advantages": f32(*advantages)}


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)


# ---- cross_entropy ----------------------------------------------------------------------------


def test_cross_entropy_is_weighted_negative_logprob_sum():
    lp = leaf(-1.0, -2.0, -0.5)
    inputs = {"target_tokens": tokens(5, 6, 7), "weights": f32(1.0, 0.5, -2.0)}
    loss, metrics = compute_loss("cross_entropy", [lp], [inputs], {})
    # 1·1 + 2·0.5 + 0.5·(-2) = 1.0
    assert close(loss.item(), 1.0)
    assert metrics == {"loss:sum": pytest.approx(1.0)}
    loss.backward()
    assert lp.grad.tolist() == [-1.0, -0.5, 2.0]  # d/dlp of -lp·w = -w


def test_cross_entropy_without_weights_uses_ones_and_sums_over_datums():
    a, b = leaf(-1.0, -2.0, -0.5), leaf(-0.25)
    loss, metrics = compute_loss(
        "cross_entropy", [a, b], [{"target_tokens": tokens(1, 2, 3)}, {"target_tokens": tokens(4)}], {}
    )
    assert close(loss.item(), 3.75)  # 1 + 2 + 0.5 + 0.25, summed, not averaged
    assert close(metrics["loss:sum"], 3.75)


def test_cross_entropy_accepts_2d_targets_with_2d_or_per_position_weights():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]], requires_grad=True)  # (N=2, K=3)
    target = torch.tensor([[1, 2, 3], [4, 5, 6]])
    weights_2d = torch.tensor([[1.0, 0.0, 0.5], [0.0, 2.0, 0.0]])
    loss, _ = compute_loss("cross_entropy", [lp], [{"target_tokens": target, "weights": weights_2d}], {})
    assert close(loss.item(), 1.0 + 1.5 + 3.0)  # 1·1 + 3·0.5 + 1.5·2
    loss.backward()
    assert lp.grad.tolist() == (-weights_2d).tolist()

    lp.grad = None
    loss, _ = compute_loss("cross_entropy", [lp], [{"target_tokens": target, "weights": f32(1.0, -1.0)}], {})
    assert close(loss.item(), (1 + 2 + 3) - (0.5 + 1.5 + 2.5))  # (N,) weights apply to all K at a position
    loss.backward()
    assert lp.grad.tolist() == [[-1.0] * 3, [1.0] * 3]


def test_cross_entropy_computes_in_float32_from_lower_precision_logprobs():
    lp = f32(-1.0, -2.0).to(torch.bfloat16).requires_grad_(True)
    loss, _ = compute_loss("cross_entropy", [lp], [{"target_tokens": tokens(1, 2)}], {})
    assert loss.dtype == torch.float32 and close(loss.item(), 3.0)
    loss.backward()
    assert lp.grad.dtype == torch.bfloat16


# ---- importance_sampling ------------------------------------------------------------------------


def test_importance_sampling_matches_hand_computation():
    lp = leaf(-1.0, -2.0, -0.5)
    datum = rl_datum(lp, [0.5, 1.0, 1.5], [1.0, -1.0, 2.0])
    loss, metrics = compute_loss("importance_sampling", [lp], [datum], {})
    # -(0.5·1 + 1·(-1) + 1.5·2) = -2.5
    assert close(loss.item(), -2.5)
    assert close(metrics["ratio:mean"], 1.0) and close(metrics["ratio:min"], 0.5) and close(metrics["ratio:max"], 1.5)
    loss.backward()
    assert lp.grad.tolist() == pytest.approx([-0.5, 1.0, -3.0])  # -r·A


def test_ratio_metrics_ignore_tokens_without_advantage():
    lp = leaf(-1.0, -2.0, -0.5)
    datum = rl_datum(lp, [4.0, 1.0, 1.5], [0.0, -1.0, 2.0])  # the prompt-like first token has A = 0
    _, metrics = compute_loss("importance_sampling", [lp], [datum], {})
    assert close(metrics["ratio:mean"], 1.25) and close(metrics["ratio:max"], 1.5)


# ---- ppo ----------------------------------------------------------------------------------------


def test_ppo_clipped_tokens_get_zero_gradient():
    lp = leaf(-1.0, -2.0, -0.5, -1.0, -3.0)
    # token:       0 r<lo A>0   1 inside   2 r>hi A>0   3 r>hi A<0   4 r<lo A<0
    datum = rl_datum(lp, [0.5, 1.0, 1.5, 1.5, 0.5], [1.0, 1.0, 1.0, -1.0, -1.0])
    loss, metrics = compute_loss("ppo", [lp], [datum], {})
    # min terms: min(.5,.8)=.5, 1, min(1.5,1.2)=1.2, min(-1.5,-1.2)=-1.5, min(-.5,-.8)=-.8; loss = -(0.4)
    assert close(loss.item(), -0.4)
    assert close(metrics["clip_fraction:mean"], 2 / 5)
    loss.backward()
    # unclipped: d/dlp of -(r·A) = -r·A; clipped (tokens 2 and 4): exactly zero
    assert lp.grad.tolist() == pytest.approx([-0.5, -1.0, 0.0, 1.5, 0.0])
    assert lp.grad[2].item() == 0.0 and lp.grad[4].item() == 0.0


def test_ppo_reads_clip_thresholds_from_config():
    lp = leaf(-1.0, -2.0)
    datum = rl_datum(lp, [1.15, 0.95], [1.0, -1.0])
    loss, metrics = compute_loss("ppo", [lp], [datum], {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1})
    # min(1.15, 1.1) = 1.1 (clipped); min(-0.95, -0.95) = -0.95 (inside): loss = -(1.1 - 0.95)
    assert close(loss.item(), -0.15)
    assert close(metrics["clip_fraction:mean"], 0.5)
    loss.backward()
    assert lp.grad.tolist() == pytest.approx([0.0, 0.95])


def test_ppo_rejects_bad_thresholds():
    lp = leaf(-1.0)
    datum = rl_datum(lp, [1.0], [1.0])
    with pytest.raises(UserError, match=r"loss_fn_config.clip_low_threshold: 1.3 is above clip_high_threshold 1.2"):
        compute_loss("ppo", [lp], [datum], {"clip_low_threshold": 1.3})
    with pytest.raises(UserError, match=r"loss_fn_config.clip_high_threshold: expected a finite number, got 'x'"):
        compute_loss("ppo", [lp], [datum], {"clip_high_threshold": "x"})


# ---- cispo --------------------------------------------------------------------------------------


def test_cispo_uses_clamped_ratio_as_constant_weight():
    lp = leaf(-1.0, -2.0, -0.5, -1.0, -3.0)
    datum = rl_datum(lp, [0.5, 1.0, 1.5, 1.5, 0.5], [1.0, 1.0, 1.0, -1.0, -1.0])
    loss, metrics = compute_loss("cispo", [lp], [datum], {})
    # clamp(r) = .8, 1, 1.2, 1.2, .8; Σ c·lp·A = -0.8 - 2 - 0.6 + 1.2 + 2.4 = 0.2
    assert close(loss.item(), -0.2)
    assert close(metrics["clip_fraction:mean"], 4 / 5)
    loss.backward()
    assert lp.grad.tolist() == pytest.approx([-0.8, -1.0, -1.2, 1.2, 0.8])  # -clamp(r)·A, never zeroed


# ---- dro ----------------------------------------------------------------------------------------


def test_dro_matches_hand_computation():
    lp = leaf(-1.0, -2.0, -0.5)
    datum = {"target_tokens": tokens(1, 2, 3), "logprobs": f32(-1.5, -2.0, -0.3), "advantages": f32(1.0, -1.0, 2.0)}
    loss, metrics = compute_loss("dro", [lp], [datum], {"beta": 0.1})
    # Σ lp·A = -1 + 2 - 1 = 0; Σ 0.5·0.1·(lp-slp)² = 0.05·(0.25 + 0 + 0.04) = 0.0145
    assert close(loss.item(), 0.0145)
    assert close(metrics["penalty:sum"], 0.0145)
    loss.backward()
    assert lp.grad.tolist() == pytest.approx([-0.95, 1.0, -2.02])  # -(A - β·(lp - slp))


def test_dro_default_beta_is_0_05():
    lp = leaf(-1.0)
    datum = {"target_tokens": tokens(1), "logprobs": f32(-2.0), "advantages": f32(0.0)}
    loss, _ = compute_loss("dro", [lp], [datum], {})
    assert close(loss.item(), 0.5 * 0.05 * 1.0)


# ---- gspo ---------------------------------------------------------------------------------------


def test_gspo_uses_masked_sequence_ratio_and_clips_per_sequence():
    a = leaf(-1.0, -2.0)
    b = leaf(-1.0, -1.0, -1.0)
    datum_a = {"target_tokens": tokens(1, 2), "logprobs": f32(-1.2, -2.4), "advantages": f32(1.0, 1.0)}
    datum_b = {
        "target_tokens": tokens(3, 4, 5),
        "logprobs": f32(-1.1, -0.9, -6.0),
        "advantages": f32(-1.0, -1.0, -1.0),
        "sequence_ratio_mask": f32(1.0, 1.0, 0.0),  # the 5.0 log-ratio of the last token is left out
    }
    loss, metrics = compute_loss("gspo", [a, b], [datum_a, datum_b], {})
    # a: s = (0.2 + 0.4)/2 = 0.3, r = e^0.3 ≈ 1.35 > 1.2, A > 0 → clipped: -(1.2 + 1.2) = -2.4
    # b: s = (0.1 - 0.1)/2 = 0, r = 1 for all three tokens: -(3·(-1)) = 3
    assert close(loss.item(), 0.6)
    assert close(metrics["sequence_ratio:mean"], (math.exp(0.3) + 1.0) / 2)
    assert close(metrics["sequence_ratio:max"], math.exp(0.3)) and close(metrics["sequence_ratio:min"], 1.0)
    assert close(metrics["clip_fraction:mean"], 2 / 5)
    loss.backward()
    assert a.grad.tolist() == [0.0, 0.0]
    assert b.grad.tolist() == pytest.approx([1.0, 1.0, 1.0])  # -r·A with r = 1, including the unmasked token


def test_gspo_without_mask_averages_every_token():
    lp = leaf(-1.0, -1.0, -1.0)
    datum = {"target_tokens": tokens(3, 4, 5), "logprobs": f32(-1.1, -0.9, -1.3), "advantages": f32(1.0, 1.0, 1.0)}
    _, metrics = compute_loss("gspo", [lp], [datum], {})
    assert close(metrics["sequence_ratio:mean"], math.exp(0.1))  # (0.1 - 0.1 + 0.3) / 3


# ---- validation ---------------------------------------------------------------------------------


def test_missing_required_input_names_datum_and_field():
    lp = [leaf(-1.0), leaf(-1.0), leaf(-1.0)]
    ok = {"target_tokens": tokens(1), "logprobs": f32(-1.0), "advantages": f32(1.0)}
    missing = {"target_tokens": tokens(1), "logprobs": f32(-1.0)}
    with pytest.raises(UserError, match=r"^loss_fn_inputs\[2\]\.advantages: required by ppo$"):
        compute_loss("ppo", lp, [ok, ok, missing], {})


def test_shape_mismatch_names_the_field():
    lp = leaf(-1.0, -2.0, -3.0)
    with pytest.raises(
        UserError, match=r"loss_fn_inputs\[0\]\.weights: shape \(2,\) does not match target_tokens \(3,\)"
    ):
        compute_loss("cross_entropy", [lp], [{"target_tokens": tokens(1, 2, 3), "weights": f32(1.0, 1.0)}], {})
    with pytest.raises(UserError, match=r"loss_fn_inputs\[0\]\.advantages: shape \(3, 1\) does not match"):
        datum = {"target_tokens": tokens(1, 2, 3), "logprobs": f32(0, 0, 0), "advantages": torch.zeros(3, 1)}
        compute_loss("importance_sampling", [lp], [datum], {})


def test_target_tokens_must_be_integer_1d_or_2d():
    with pytest.raises(UserError, match=r"loss_fn_inputs\[0\]\.target_tokens: expected an integer tensor"):
        compute_loss("cross_entropy", [leaf(-1.0)], [{"target_tokens": f32(1.0)}], {})


def test_non_finite_input_is_rejected_by_name():
    lp = leaf(-1.0, -2.0)
    datum = {"target_tokens": tokens(1, 2), "logprobs": f32(-1.0, -1.0), "advantages": f32(1.0, math.nan)}
    with pytest.raises(UserError, match=r"loss_fn_inputs\[0\]\.advantages: contains nan or inf"):
        compute_loss("importance_sampling", [lp], [datum], {})


def test_non_finite_loss_is_a_user_error():
    lp = leaf(0.0)
    datum = {"target_tokens": tokens(1), "logprobs": f32(-100.0), "advantages": f32(1.0)}  # exp(100) overflows float32
    with pytest.raises(UserError, match=r"loss_fn 'importance_sampling': loss is not finite"):
        compute_loss("importance_sampling", [lp], [datum], {})


def test_unknown_loss_lists_the_available_ones():
    with pytest.raises(UserError, match=r"^loss_fn: unknown loss 'x'; built-in: .*cross_entropy.*ppo"):
        compute_loss("x", [leaf(-1.0)], [{"target_tokens": tokens(1)}], {})
    register_loss("someone_elses_secret", lambda *a: None, custom=True)  # another key's loss on this worker
    try:
        with pytest.raises(UserError) as refused:
            get_loss("x")
        assert "someone_elses_secret" not in str(refused.value)
    finally:
        unregister_loss("someone_elses_secret")
    with pytest.raises(
        UserError, match=r"loss_fn: 'stable_reinforce' is not supported: its formula is not public.*cross_entropy"
    ) as refused:
        get_loss("stable_reinforce")
    for name in ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo"):
        assert name in str(refused.value)


def test_empty_batch_is_rejected():
    with pytest.raises(UserError, match=r"^data: at least one datum is required$"):
        compute_loss("cross_entropy", [], [], {})


# ---- metrics and the registry -------------------------------------------------------------------

ALL_INPUTS = {
    "target_tokens": tokens(1, 2, 3),
    "logprobs": f32(-1.1, -2.2, -0.4),
    "advantages": f32(1.0, -0.5, 0.0),
    "weights": f32(1.0, 1.0, 0.0),
}


@pytest.mark.parametrize("name", ["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo"])
def test_every_builtin_emits_loss_sum_and_well_formed_metric_keys(name):
    lp = leaf(-1.0, -2.0, -0.5)
    loss, metrics = compute_loss(name, [lp], [dict(ALL_INPUTS)], {})
    assert metrics["loss:sum"] == pytest.approx(loss.item())
    for key, value in metrics.items():
        assert key.count(":") == 1, key
        metric, reduction = key.split(":")
        assert metric and reduction in ("mean", "sum", "min", "max"), key
        assert isinstance(value, float) and math.isfinite(value)
    entry = next(row for row in list_losses() if row["name"] == name)
    assert sorted(metrics) == sorted(entry["metrics"])  # the documented keys are exactly the emitted ones


def test_list_losses_describes_builtins_as_plain_data():
    rows = {row["name"]: row for row in list_losses()}
    assert {"cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo"} <= set(rows)
    ppo = rows["ppo"]
    assert ppo["builtin"] is True and ppo["custom"] is False
    assert ppo["required_inputs"] == ["target_tokens", "logprobs", "advantages"]
    assert ppo["config"] == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert "clamp(r, lo, hi)" in ppo["docstring"] and ppo["signature"].startswith("ppo(")
    assert rows["cross_entropy"]["optional_inputs"] == ["weights"]
    assert rows["gspo"]["optional_inputs"] == ["sequence_ratio_mask"]


def test_builtin_names_cannot_be_taken_or_removed():
    with pytest.raises(UserError, match="taken by a built-in loss"):
        register_loss("ppo", lambda *a: None, custom=True)
    with pytest.raises(UserError, match="built-in losses cannot be removed"):
        unregister_loss("ppo")


# ---- custom losses (contract.py) ----------------------------------------------------------------


def weighted_is_loss(model_outputs, loss_fn_inputs, attention_mask, scale=1.0):
    """-(scale · lp · A), masked, summed."""
    lp = model_outputs["logprobs"]  # (B, T)
    loss = -(scale * lp * loss_fn_inputs["advantages"] * attention_mask).sum()
    return LossFnOutput(loss=loss, logprobs=lp, diagnostics={"tokens": attention_mask.sum(), "adv:max": 2.0})


@pytest.fixture
def custom_loss():
    register_loss("test_weighted_is", weighted_is_loss, custom=True, required_inputs=("advantages",))
    try:
        yield "test_weighted_is"
    finally:
        unregister_loss("test_weighted_is")


def test_pad_batch_pads_with_zeros_and_marks_real_positions():
    padded, mask = pad_batch([f32(1.0, 2.0, 3.0), f32(4.0)])
    assert padded.tolist() == [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]
    assert mask.tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]] and mask.dtype == torch.float32
    padded, mask = pad_batch([torch.ones(2, 3, dtype=torch.int64), torch.ones(1, 3, dtype=torch.int64)])
    assert padded.shape == (2, 2, 3) and padded.dtype == torch.int64 and mask.shape == (2, 2)


def test_custom_loss_runs_through_compute_loss_by_name_and_by_loss_id(custom_loss):
    a, b = leaf(-1.0, -2.0, -0.5), leaf(-3.0)
    inputs = [
        {"target_tokens": tokens(1, 2, 3), "advantages": f32(1.0, -1.0, 2.0)},
        {"target_tokens": tokens(4), "advantages": f32(0.5)},
    ]
    loss, metrics = compute_loss(custom_loss, [a, b], inputs, {"scale": 2.0})
    # -2·(-1 + 2 - 1 - 1.5) = 3.0
    assert close(loss.item(), 3.0)
    assert metrics == {"tokens:mean": 4.0, "adv:max": 2.0, "loss:sum": pytest.approx(3.0)}
    loss.backward()
    assert a.grad.tolist() == [-2.0, 2.0, -4.0] and b.grad.tolist() == [-1.0]

    loss, _ = compute_loss(
        "custom", [leaf(-1.0)], [{"target_tokens": tokens(1), "advantages": f32(1.0)}], {"loss_id": custom_loss}
    )
    assert close(loss.item(), 1.0)


def test_custom_loss_inputs_are_validated_like_builtins(custom_loss):
    with pytest.raises(UserError, match=r"^loss_fn_inputs\[0\]\.advantages: required by test_weighted_is$"):
        compute_loss(custom_loss, [leaf(-1.0)], [{"target_tokens": tokens(1)}], {})
    with pytest.raises(
        UserError, match=r"loss_fn_inputs\[0\]\.advantages: shape \(2,\) does not match target_tokens \(1,\)"
    ):
        compute_loss(custom_loss, [leaf(-1.0)], [{"target_tokens": tokens(1), "advantages": f32(1.0, 1.0)}], {})
    ok = {"target_tokens": tokens(1), "advantages": f32(1.0)}
    with pytest.raises(UserError, match=r"loss_fn_inputs\[1\]: keys .* differ from loss_fn_inputs\[0\]"):
        compute_loss(custom_loss, [leaf(-1.0), leaf(-1.0)], [ok, {**ok, "extra": f32(1.0)}], {})
    with pytest.raises(UserError, match=r"loss_fn_config.loss_id: 'ppo' is not a custom loss"):
        compute_loss("custom", [leaf(-1.0)], [ok], {"loss_id": "ppo"})
    with pytest.raises(UserError, match=r"loss_fn_config.loss_id: required"):
        compute_loss("custom", [leaf(-1.0)], [ok], {})


def _call(fn, *, requires_grad: bool = True, config: dict | None = None):
    lp = f32(-1.0, -2.0).reshape(1, 2).requires_grad_(requires_grad)
    model_outputs = {"logprobs": lp, "target_tokens": torch.tensor([[1, 2]])}
    return call_custom_loss(
        fn, model_outputs, {"advantages": f32(1.0, 1.0).reshape(1, 2)}, torch.ones(1, 2), config or {}, name="mine"
    )


def test_custom_contract_accepts_tuple_and_dict_results():
    loss, metrics = _call(lambda mo, inp, mask: (-mo["logprobs"].sum(), {"x": 1, "y:sum": 2.0}))
    assert close(loss.item(), 3.0) and metrics == {"x:mean": 1.0, "y:sum": 2.0}
    loss, metrics = _call(lambda mo, inp, mask: {"loss": -mo["logprobs"].sum()})
    assert close(loss.item(), 3.0) and metrics == {}


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (
            lambda mo, inp, mask: LossFnOutput(-mo["logprobs"], None, {}),
            r"custom loss 'mine': loss has shape \(1, 2\); expected a scalar",
        ),
        (
            lambda mo, inp, mask: LossFnOutput(mo["logprobs"].sum() * math.nan, None, {}),
            r"custom loss 'mine': loss is not finite \(nan\)",
        ),
        (lambda mo, inp, mask: {"diagnostics": {}}, r"custom loss 'mine': returned a dict without 'loss'"),
        (lambda mo, inp, mask: {"loss": mo["logprobs"].sum(), "extra": 1}, r"unexpected keys \['extra'\]"),
        (lambda mo, inp, mask: 3.0, r"custom loss 'mine': returned float; expected LossFnOutput"),
        (lambda mo, inp, mask: (mo["logprobs"].sum(),), r"returned a tuple of 1 items"),
        (lambda mo, inp, mask: (1.5, {}), r"custom loss 'mine': loss is float; expected a torch scalar tensor"),
        (lambda mo, inp, mask: (mo["logprobs"].sum().detach(), {}), r"custom loss 'mine': loss does not require grad"),
        (
            lambda mo, inp, mask: (mo["logprobs"].sum(), {"a:b:sum": 1.0}),
            r"metric key 'a:b:sum': must contain exactly one ':'",
        ),
        (lambda mo, inp, mask: (mo["logprobs"].sum(), {"a:median": 1.0}), r"unknown reduction 'median'"),
        (lambda mo, inp, mask: (mo["logprobs"].sum(), {"a": "high"}), r"diagnostics\['a'\] is str; expected a number"),
        (lambda mo, inp, mask: (mo["logprobs"].sum(), {"a": math.inf}), r"diagnostics\['a'\] is not finite"),
        (lambda mo, inp, mask: (mo["logprobs"].sum(), [1.0]), r"diagnostics is list; expected a dict"),
        (
            lambda mo, inp, mask: LossFnOutput(mo["logprobs"].sum(), torch.zeros(3), {}),
            r"logprobs has shape \(3,\); expected \(1, 2\)",
        ),
        (lambda mo, inp, mask: 1 / 0, r"custom loss 'mine' raised ZeroDivisionError: division by zero"),
    ],
)
def test_custom_contract_rejects_bad_results_with_a_precise_message(fn, message):
    with pytest.raises(UserError, match=message):
        _call(fn)


def test_custom_contract_passes_config_as_keyword_arguments():
    with pytest.raises(UserError, match=r"raised TypeError: .*unexpected keyword argument 'beta'"):
        _call(lambda mo, inp, mask: (mo["logprobs"].sum(), {}), config={"beta": 0.1})
    loss, _ = _call(lambda mo, inp, mask, beta: (beta * mo["logprobs"].sum(), {}), config={"beta": 0.5})
    assert close(loss.item(), -1.5)


def test_custom_contract_allows_no_grad_in_forward_only_calls():
    loss, _ = _call(lambda mo, inp, mask: (mo["logprobs"].sum(), {}), requires_grad=False)
    assert close(loss.item(), -3.0)


def test_custom_contract_metric_keys_from_diagnostics_are_normalized():
    assert set(VALID_REDUCTIONS) >= {"mean", "sum", "min", "max"}
    _, metrics = _call(lambda mo, inp, mask: (mo["logprobs"].sum(), {"kl": torch.tensor(0.25), "n:sum": 3}))
    assert metrics == {"kl:mean": 0.25, "n:sum": 3.0}
