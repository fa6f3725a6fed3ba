"""The native HTTP API of the original sketch (add_lora, fwdbwd, optim_step, sample, retrieve_future, …).

JSON in, request ids out; results through /retrieve_future. Same Service calls as the Tinker face.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from api import limits, validate
from api.auth import public
from api.datums import check_tokens
from api.futures import PENDING, error_body
from api.jsonwire import body, datums_from_json, required, result_json, target_prompt_from_json, tokens_from_json
from api.service import Service, sequence_ids
from api.validate import MAX_TOPK
from core.errors import UserError
from core.wire import encode_array

bp = Blueprint("native", __name__)
# App-wide (every face, registered with this first blueprint): no body past TINKERBELL_MAX_BODY_BYTES is read.
bp.before_app_request(limits.limit_body)
bp.app_errorhandler(RequestEntityTooLarge)(limits.answer_too_large)
MAX_POLL_S = 60.0  # a native long-poll holds its thread at most this long, whatever timeout it asks for


def service() -> Service:
    return current_app.config["SERVICE"]


@bp.get("/healthz")
@bp.get("/api/v1/healthz")
@public
def healthz():
    registry = current_app.config["REGISTRY"]
    if not registry.reachable():
        return jsonify(status="redis unavailable", workers=[]), 503
    workers = registry.live_workers()
    return jsonify(
        status="ok",
        workers=[{"name": w["name"], "device": w.get("device"), "adapters": len(w["adapters"])} for w in workers],
    )


@bp.get("/get_server_capabilities")
@bp.get("/api/v1/get_server_capabilities")
def get_server_capabilities():
    models = [{"model_name": name, "trainable": True, "sampleable": True} for name in service().supported_models()]
    return jsonify(supported_models=models)


@bp.get("/list_loss_functions")
def list_loss_functions():
    registry = current_app.config["REGISTRY"]
    builtins = sorted(registry.builtin_losses(), key=lambda c: c["name"])
    custom = sorted(registry.custom_losses(g.owner), key=lambda c: c["name"])
    return jsonify(
        loss_functions=builtins + custom, builtin=[c["name"] for c in builtins], custom=[c["name"] for c in custom]
    )


@bp.post("/add_lora")
def add_lora():
    payload = body()
    lora = dict(validate.mapping(payload.get("lora_config"), "lora_config"))
    for key in ("rank", "alpha", "seed", "train_attn", "train_mlp", "train_unembed"):
        if key in payload:
            lora[key] = payload[key]
    model_id, request_id = service().create_model(
        g.owner, payload.get("session_id"), None, payload.get("base_model"), lora, payload.get("user_metadata")
    )
    return jsonify(model_id=model_id, request_id=request_id)


@bp.post("/remove_lora")
def remove_lora():
    return jsonify(request_id=service().remove_model(g.owner, required(body(), "model_id")))


@bp.post("/fwdbwd")
@bp.post("/forward")
def fwdbwd():
    payload = body()
    model_id = required(payload, "model_id")
    data = datums_from_json(payload.get("data"))
    forward_only = validate.boolean(payload.get("forward_only"), "forward_only", request.path == "/forward")
    loss_fn = payload.get("loss_fn", "cross_entropy")
    request_id = service().forward_backward(
        g.owner, model_id, payload.get("seq_id"), data, loss_fn, payload.get("loss_fn_config"), forward_only
    )
    return jsonify(request_id=request_id, model_id=model_id)


@bp.post("/optim_step")
def optim_step():
    payload = body()
    model_id = required(payload, "model_id")
    request_id = service().optim_step(g.owner, model_id, payload.get("seq_id"), payload.get("adam_params"))
    return jsonify(request_id=request_id, model_id=model_id)


@bp.post("/save_state")
def save_state():
    payload = body()
    model_id = required(payload, "model_id")
    kind = "sampler_weights" if validate.boolean(payload.get("for_sampler"), "for_sampler") else "weights"
    request_id = service().save_state(
        g.owner, model_id, payload.get("seq_id"), payload.get("name"), kind, payload.get("ttl_seconds")
    )
    return jsonify(request_id=request_id, model_id=model_id)


@bp.post("/load_state")
def load_state():
    payload = body()
    model_id = required(payload, "model_id")
    with_optimizer = validate.boolean(payload.get("optimizer"), "optimizer", default=True)
    request_id = service().load_state(
        g.owner, model_id, payload.get("seq_id"), required(payload, "path"), with_optimizer
    )
    return jsonify(request_id=request_id, model_id=model_id)


def _native_sample(payload: dict[str, Any]) -> str:
    """Sample from a base model (base_model) or saved weights (model_path: tinker://…)."""
    svc = service()
    sampler_id = validate.optional_string(payload.get("sampling_session_id"), "sampling_session_id")
    if sampler_id:
        sampler = current_app.config["REGISTRY"].sampler(sampler_id, g.owner)
        base_model, adapter_dir = sampler["base_model"], sampler["adapter_dir"]
    else:
        base_model, adapter_dir = svc.sampler_target(g.owner, payload.get("base_model"), payload.get("model_path"))
    tokens = tokens_from_json(payload.get("prompt"), "prompt")
    check_tokens(tokens, "prompt")
    options = (payload.get("num_samples", 1), payload.get("prompt_logprobs"), payload.get("topk_prompt_logprobs"))
    return svc.sample(
        g.owner,
        base_model,
        adapter_dir,
        encode_array(tokens, "int64"),
        payload.get("sampling_params"),
        *options,
        topk_sample_logprobs=payload.get("topk_sample_logprobs"),
        target_prompt_logprobs=target_prompt_from_json(payload.get("target_prompt_logprobs"), len(tokens), MAX_TOPK),
        prompt_alt_tokens_k=payload.get("prompt_alt_tokens_k"),
        record_stability_info=payload.get("record_stability_info"),
        sampler_id=sampler_id,
    )


@bp.post("/api/v1/sample")
def sample_sync():
    request_id = _native_sample(body())
    return _answer(request_id, "sample", timeout_s=600.0)


@bp.post("/asample")
@bp.post("/api/v1/asample")
def asample():
    """Tinker's asample body (sampling_session_id) or the native one (base_model / model_path)."""
    payload = body()
    request_id = _native_sample(payload)
    return jsonify(request_id=request_id, sample_sequence_ids=sequence_ids(request_id, payload.get("num_samples", 1)))


def poll_answer(future: dict[str, Any], request_id: str, timeout_s: float) -> tuple[Response | None, Any]:
    """Long-poll a future: (the answer, None) while it is pending or when it failed, else (None, its result)."""
    outcome = service().poll(future, request_id, timeout_s)
    if outcome is PENDING:
        return jsonify(type="try_again", request_id=request_id, queue_state="active"), None
    state, result = outcome
    if state != "SUCCESS":
        return jsonify(error_body(result)), None
    return None, result


def _answer(request_id: str, kind: str, timeout_s: float, future: dict[str, Any] | None = None) -> Response:
    waiting, result = poll_answer(future or {}, request_id, timeout_s)
    return waiting or jsonify(result_json(kind, result))


@bp.post("/retrieve_future")
def retrieve_future():
    payload = body()
    request_id = required(payload, "request_id")
    timeout = payload.get("timeout")
    timeout_s = (
        current_app.config["SETTINGS"].poll_timeout_s if timeout is None else validate.number(timeout, "timeout")
    )
    if timeout_s < 0:
        raise UserError(f"timeout: must not be negative, got {timeout_s}")
    future = current_app.config["REGISTRY"].future(request_id, g.owner)
    return _answer(request_id, future["kind"], min(timeout_s, MAX_POLL_S), future)
