"""The native HTTP API of the original sketch (add_lora, fwdbwd, optim_step, sample, retrieve_future, …).

JSON in, request ids out; results through /retrieve_future. Same Service calls as the Tinker face.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, g, jsonify, request

from api.auth import public
from api.futures import PENDING, error_body
from api.jsonwire import body, datums_from_json, required, result_json, tokens_from_json
from api.service import Service
from core.errors import UserError
from core.wire import encode_array

bp = Blueprint("native", __name__)


def service() -> Service:
    return current_app.config["SERVICE"]


@bp.get("/healthz")
@bp.get("/api/v1/healthz")
@public
def healthz():
    workers = current_app.config["REGISTRY"].live_workers()
    return jsonify(status="ok", workers=[{"name": w["name"], "device": w.get("device"), "adapters": len(w["adapters"])} for w in workers])


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
    return jsonify(loss_functions=builtins + custom, builtin=[c["name"] for c in builtins], custom=[c["name"] for c in custom])


@bp.post("/add_lora")
def add_lora():
    payload = body()
    lora = dict(payload.get("lora_config") or {})
    for key in ("rank", "alpha", "seed", "train_attn", "train_mlp", "train_unembed"):
        if key in payload:
            lora[key] = payload[key]
    model_id, request_id = service().create_model(g.owner, payload.get("session_id"), None, payload.get("base_model"), lora, payload.get("user_metadata"))
    return jsonify(model_id=model_id, request_id=request_id)


@bp.post("/remove_lora")
def remove_lora():
    return jsonify(request_id=service().remove_model(g.owner, required(body(), "model_id")))


def _seq_id(payload: dict[str, Any]) -> int | None:
    seq_id = payload.get("seq_id")
    if seq_id is not None and (not isinstance(seq_id, int) or seq_id < 1):
        raise UserError(f"seq_id: must be a positive integer, got {seq_id!r}")
    return seq_id


@bp.post("/fwdbwd")
@bp.post("/forward")
def fwdbwd():
    payload = body()
    model_id = required(payload, "model_id")
    data = datums_from_json(payload.get("data"))
    config = payload.get("loss_fn_config") or {}
    if not isinstance(config, dict):
        raise UserError("loss_fn_config: must be an object")
    forward_only = bool(payload.get("forward_only", request.path == "/forward"))
    request_id = service().forward_backward(g.owner, model_id, _seq_id(payload), data, payload.get("loss_fn", "cross_entropy"), config, forward_only)
    return jsonify(request_id=request_id, model_id=model_id)


@bp.post("/optim_step")
def optim_step():
    payload = body()
    model_id = required(payload, "model_id")
    request_id = service().optim_step(g.owner, model_id, _seq_id(payload), payload.get("adam_params"))
    return jsonify(request_id=request_id, model_id=model_id)


@bp.post("/save_state")
def save_state():
    payload = body()
    model_id = required(payload, "model_id")
    kind = "sampler_weights" if payload.get("for_sampler") else "weights"
    request_id = service().save_state(g.owner, model_id, _seq_id(payload), payload.get("name"), kind, payload.get("ttl_seconds"))
    return jsonify(request_id=request_id, model_id=model_id)


@bp.post("/load_state")
def load_state():
    payload = body()
    model_id = required(payload, "model_id")
    request_id = service().load_state(g.owner, model_id, _seq_id(payload), required(payload, "path"), bool(payload.get("optimizer", True)))
    return jsonify(request_id=request_id, model_id=model_id)


def _native_sample(payload: dict[str, Any]) -> str:
    """Sample from a base model (base_model) or saved weights (model_path: tinker://…)."""
    svc = service()
    if payload.get("sampling_session_id"):
        sampler = current_app.config["REGISTRY"].sampler(payload["sampling_session_id"], g.owner)
        base_model, adapter_dir = sampler["base_model"], sampler["adapter_dir"]
    else:
        base_model, adapter_dir = svc.sampler_target(g.owner, payload.get("base_model"), payload.get("model_path"))
    prompt = encode_array(tokens_from_json(required(payload, "prompt"), "prompt"), "int64")
    return svc.sample(g.owner, base_model, adapter_dir, prompt, payload.get("sampling_params"), payload.get("num_samples", 1), payload.get("prompt_logprobs", False), payload.get("topk_prompt_logprobs", 0))


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
    num_samples = payload.get("num_samples", 1)
    return jsonify(request_id=request_id, sample_sequence_ids=[f"{request_id}:{i}" for i in range(num_samples)])


def _answer(request_id: str, kind: str, timeout_s: float, future: dict[str, Any] | None = None):
    outcome = service().poll(future or {}, request_id, timeout_s)
    if outcome is PENDING:
        return jsonify(type="try_again", request_id=request_id, queue_state="active")
    state, result = outcome
    if state != "SUCCESS":
        return jsonify(error_body(result))
    return jsonify(result_json(kind, result))


@bp.post("/retrieve_future")
def retrieve_future():
    payload = body()
    request_id = required(payload, "request_id")
    future = current_app.config["REGISTRY"].future(request_id, g.owner)
    timeout_s = min(float(payload.get("timeout", current_app.config["SETTINGS"].poll_timeout_s)), 60.0)
    return _answer(request_id, future["kind"], timeout_s, future)
