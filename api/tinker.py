"""The Tinker face: `/api/v1/...` as the official `tinker` SDK 0.38 speaks it (JSON, plus protobuf for fwd/bwd).

Each route translates the SDK's request into the same Service call the native face makes (one code path);
REST listing and checkpoint downloads live in api.tinker_rest. See the wire notes in README.md,
"Use it with the Tinker SDK".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from api import proto, validate
from api.jsonwire import result_json
from api.native import body, poll_answer, required, service
from api.tinker_rest import rest_bp
from core.errors import UserError
from core.registry import P, Registry

bp = Blueprint("tinker", __name__, url_prefix="/api/v1")
bp.register_blueprint(rest_bp)

# Flags the SDK reads once per client (tinker.types.ClientConfigResponse); every one is chosen, not defaulted.
CLIENT_CONFIG = {
    "pjwt_auth_enabled": False,  # keys are plain tml- API keys; no JWT exchange
    "credential_default_source": "api_key",
    "parallel_fwdbwd_chunks": True,  # safe: the registry releases a model's requests in seq_id order
    "proto_compress_fwdbwd": True,  # fwd/bwd bodies arrive zstd-compressed; api.proto.decompress undoes it
    "fwdbwd_max_chunk_len": 1024,
    "fwdbwd_max_chunk_bytes_count": 5_000_000,
    "use_pyqwest_transport": True,
    "sample_use_retrieve_futures": False,  # no /retrieve_futures session poller: one long-poll per future
    "custom_loss_server_side": True,  # create_custom_loss uploads a graph (api.loss_graphs): one pass, no client torch
    "sample_join_sampling_session": False,
    "sample_no_retries": False,
    "sample_max_concurrent_requests": 2000,
}
DYNAMIC_CONFIG = {"refresh_interval_sec": 300, "sample_cancel_enabled": False, "sample_cancel_max_batch_size": 64}
PROTO_KINDS = {"forward_backward", "forward", "sample"}


def registry() -> Registry:
    return current_app.config["REGISTRY"]


def _int(payload: dict[str, Any], name: str) -> int:
    """A required non-negative integer field (model_seq_id, sampling_session_seq_id)."""
    return validate.integer(payload.get(name), name)


def _seq_id(payload: dict[str, Any]) -> int | None:
    return validate.seq_id(payload.get("seq_id"))


def _check_optimizer(config: Any) -> None:
    if config is not None and (not isinstance(config, dict) or config.get("type", "adamw") != "adamw"):
        raise UserError(f"optimizer_config: only {{'type': 'adamw'}} is supported, got {config!r}")


@contextmanager
def _refusal_uses_seq(model_id: Any, seq_id: int | None) -> Iterator[None]:
    """A request refused here still used up its seq_id on the client; admit it as a no-op so later ones run. Not
    one refused with 429 (the owner's queue is full): the SDK sends that one again with the same seq_id."""
    try:
        yield
    except UserError as exc:
        if isinstance(model_id, str) and seq_id is not None and getattr(exc, "status", None) != 429:
            service().skip_seq(g.owner, model_id, seq_id)
        raise


@contextmanager
def _ordered(payload: dict[str, Any]) -> Iterator[tuple[str, int | None]]:
    """(model_id, seq_id) of a JSON request that touches a model, for a block whose refusal uses up the seq_id."""
    model_id, seq_id = required(payload, "model_id"), _seq_id(payload)
    with _refusal_uses_seq(model_id, seq_id):
        yield model_id, seq_id


def _future(request_id: str, model_id: str | None = None, **extra: Any) -> Response:
    """UntypedAPIFuture: {request_id, model_id?, …}."""
    answer: dict[str, Any] = {"request_id": request_id}
    if model_id is not None:
        answer["model_id"] = model_id
    answer.update(extra)
    return jsonify(answer)


# ---- bootstrap ------------------------------------------------------------------------------
@bp.post("/client/config")
def client_config():
    """The SDK splits fwd/bwd batches into chunks this small, so a stock client stays inside the TINKERBELL_MAX_*
    limits (api.limits) that would refuse a larger request."""
    settings = current_app.config["SETTINGS"]
    return jsonify(
        {
            **CLIENT_CONFIG,
            "fwdbwd_max_chunk_len": min(CLIENT_CONFIG["fwdbwd_max_chunk_len"], settings.max_request_datums),
            "fwdbwd_max_chunk_bytes_count": min(
                CLIENT_CONFIG["fwdbwd_max_chunk_bytes_count"], settings.max_body_bytes // 2
            ),
        }
    )


@bp.post("/client/dynamic_config")
def dynamic_config():
    return jsonify(DYNAMIC_CONFIG)


@bp.post("/create_session")
def create_session():
    payload = body()
    tags = payload.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise UserError("tags: must be a list of strings")
    metadata = validate.metadata(payload.get("user_metadata"))
    session_id = registry().create_session(g.owner, tags=tags, user_metadata=metadata)
    extra = {k: payload[k] for k in ("sdk_version", "project_id", "display_name") if isinstance(payload.get(k), str)}
    if extra:
        registry().touch_session(session_id, g.owner, **extra)
    return jsonify(type="create_session", session_id=session_id)


@bp.post("/session_heartbeat")
def session_heartbeat():
    session_id = required(body(), "session_id")
    registry().live_session(session_id, g.owner)  # a finished session answers 410: the SDK stops its heartbeat
    registry().touch_session(session_id, g.owner)
    return jsonify(type="session_heartbeat")


@bp.post("/sessions/<session_id>/finish")
def finish_session(session_id: str):
    payload = request.get_json(silent=True) or {}
    reason = payload.get("reason") if isinstance(payload, dict) else None
    status = reason.get("type", "success") if isinstance(reason, dict) else "success"
    service().finish_session(g.owner, session_id, status if isinstance(status, str) else "success")
    return jsonify(session_id=session_id, status="finished")


@bp.post("/telemetry")
def telemetry():
    return jsonify(status="accepted")


@bp.post("/cancel_future")
def cancel_future():
    """Accepted and ignored: sample_cancel_enabled is false, a running sample finishes and is dropped."""
    registry().future(required(body(), "request_id"), g.owner)
    return jsonify(status="accepted")


# ---- training -------------------------------------------------------------------------------
@bp.post("/create_model")
def create_model():
    payload = body()
    _check_optimizer(payload.get("optimizer_config"))
    model_id, request_id = service().create_model(
        g.owner,
        required(payload, "session_id"),
        _int(payload, "model_seq_id"),
        payload.get("base_model"),
        payload.get("lora_config"),
        payload.get("user_metadata"),
    )
    return _future(request_id, model_id)


@bp.post("/get_info")
def get_info():
    model_id = required(body(), "model_id")
    model = registry().model(model_id, g.owner)
    base_model = model["base_model"]
    return jsonify(
        type="get_info",
        model_id=model_id,
        # tokenizer_id = the hub name: the SDK loads it from the local HF cache
        # (`python -m backends.models install-tokenizer`).
        model_data={"arch": "lora", "model_name": base_model, "tokenizer_id": base_model},
        is_lora=True,
        lora_rank=model["lora"]["rank"],
        model_name=base_model,
        optimizer_config={"type": "adamw"},
    )


@bp.post("/forward_backward")
def forward_backward():
    """Body: tinker_public.ForwardBackwardRequest (zstd when client/config says so); JSON is accepted too."""
    if request.mimetype == "application/json":
        return _forward_backward_json(body())
    limit = current_app.config["SETTINGS"].max_body_bytes
    raw = proto.decompress(request.get_data(cache=False), request.headers.get("Content-Encoding"), limit)
    msg = proto.parse_forward_backward(raw)
    seq_id = validate.seq_id(msg.seq_id)
    with _refusal_uses_seq(msg.model_id, seq_id):
        data = proto.wire_datums(msg)
        request_id = service().forward_backward(
            g.owner,
            msg.model_id,
            seq_id,
            data,
            msg.loss_fn or "cross_entropy",
            proto.loss_config(msg),
            msg.forward_only,
        )
    return _future(request_id, msg.model_id)


def _forward_backward_json(payload: dict[str, Any]) -> Response:
    """The SDK's JSON ForwardBackwardRequest shape
    {model_id, seq_id, forward_backward_input: {data, loss_fn, loss_fn_config}}."""
    from api.jsonwire import datums_from_json

    with _ordered(payload) as (model_id, seq_id):
        inputs = validate.mapping(payload.get("forward_backward_input"), "forward_backward_input") or payload
        data = datums_from_json(inputs.get("data"))
        loss_fn = inputs.get("loss_fn", "cross_entropy")
        forward_only = validate.boolean(payload.get("forward_only"), "forward_only")
        request_id = service().forward_backward(
            g.owner, model_id, seq_id, data, loss_fn, inputs.get("loss_fn_config"), forward_only
        )
    return _future(request_id, model_id)


@bp.post("/optim_step")
def optim_step():
    payload = body()
    with _ordered(payload) as (model_id, seq_id):
        params = payload.get("optimizer_params")
        if params is not None and (not isinstance(params, dict) or params.get("type", "adamw") != "adamw"):
            raise UserError(f"optimizer_params: only AdamW (adam_params) is supported, got {params!r}")
        request_id = service().optim_step(g.owner, model_id, seq_id, payload.get("adam_params"))
    return _future(request_id, model_id)


@bp.post("/save_weights")
def save_weights():
    payload = body()
    with _ordered(payload) as (model_id, seq_id):
        request_id = service().save_state(
            g.owner, model_id, seq_id, payload.get("path"), "weights", payload.get("ttl_seconds")
        )
    return _future(request_id, model_id)


@bp.post("/save_weights_for_sampler")
def save_weights_for_sampler():
    """Named ({path}) → tinker://…/sampler_weights/<name>; ephemeral ({sampling_session_seq_id}) → a sampler id."""
    payload = body()
    with _ordered(payload) as (model_id, seq_id):
        name = payload.get("path")
        sampler_id = None
        if name is None:
            if payload.get("sampling_session_seq_id") is None:
                raise UserError("path: give a checkpoint name, or sampling_session_seq_id for an ephemeral sampler")
            sampling_seq = _int(payload, "sampling_session_seq_id")
            model = registry().model(model_id, g.owner)
            sampler_id = f"{model['session_id']}:sample:{sampling_seq}"
        request_id = service().save_state(
            g.owner, model_id, seq_id, name, "sampler_weights", payload.get("ttl_seconds"), sampler_id=sampler_id
        )
    return _future(request_id, model_id)


@bp.post("/save_weights_external")
def save_weights_external():
    payload = body()
    with _ordered(payload) as (model_id, seq_id):
        if payload.get("age_encryption_recipients"):
            raise UserError("age_encryption_recipients: encrypted exports are not supported")
        request_id = service().save_state(
            g.owner, model_id, seq_id, payload.get("path"), "external_weights", payload.get("ttl_seconds")
        )
    return _future(request_id, model_id)


@bp.post("/load_weights")
def load_weights():
    """Create-via-load {session_id, model_seq_id, path, optimizer} (a new model), or legacy {model_id, seq_id, path}."""
    payload = body()
    path = required(payload, "path")
    with_optimizer = validate.boolean(payload.get("optimizer"), "optimizer")
    if payload.get("model_id") is not None:
        with _ordered(payload) as (model_id, seq_id):
            request_id = service().load_state(g.owner, model_id, seq_id, path, with_optimizer)
        return _future(request_id, model_id)
    _check_optimizer(payload.get("optimizer_config"))
    checkpoint = service().resolve_checkpoint(g.owner, path)
    base_model = payload.get("base_model")
    if base_model is not None and base_model != checkpoint["base_model"]:
        raise UserError(f"base_model: {path} was trained on {checkpoint['base_model']!r}, not {base_model!r}")
    session_id, model_seq_id = required(payload, "session_id"), _int(payload, "model_seq_id")
    model_id, request_id = service().create_model_from_checkpoint(
        g.owner, session_id, model_seq_id, path, with_optimizer, payload.get("user_metadata")
    )
    return _future(request_id, model_id)


@bp.post("/weights_info")
def weights_info():
    checkpoint = service().resolve_checkpoint(g.owner, required(body(), "tinker_path"))
    lora = checkpoint.get("lora") or {}
    return jsonify(
        base_model=checkpoint["base_model"],
        optimizer_config={"type": "adamw"},
        is_lora=True,
        lora_rank=lora.get("rank"),
        train_unembed=lora.get("train_unembed"),
        train_mlp=lora.get("train_mlp"),
        train_attn=lora.get("train_attn"),
    )


# ---- sampling (asample itself is the native face's /api/v1/asample: the same Service.sample) -------
@bp.post("/create_sampling_session")
def create_sampling_session():
    payload = body()
    session_id = required(payload, "session_id")
    seq = _int(payload, "sampling_session_seq_id")
    model_path = validate.optional_string(payload.get("model_path"), "model_path")
    registry().live_session(session_id, g.owner)
    sampler_id = f"{session_id}:sample:{seq}"
    base_model, adapter_dir = service().sampler_target(g.owner, payload.get("base_model"), model_path)
    if registry().redis.exists(f"{P}sampler:{sampler_id}"):
        registry().sampler(sampler_id, g.owner)  # a re-send answers the same id; another key's is NotFound
    else:
        registry().create_sampler(sampler_id, g.owner, session_id, base_model, model_path, adapter_dir)
    return jsonify(type="create_sampling_session", sampling_session_id=sampler_id)


@bp.get("/samplers/<sampler_id>")
def get_sampler(sampler_id: str):
    sampler = registry().sampler(sampler_id, g.owner)
    return jsonify(sampler_id=sampler_id, base_model=sampler["base_model"], model_path=sampler.get("model_path"))


# ---- futures --------------------------------------------------------------------------------
@bp.post("/retrieve_future")
def retrieve_future():
    """Long-poll: hold a pending future up to TINKERBELL_POLL_TIMEOUT_S (the SDK re-polls at once on try_again)."""
    payload = body()
    request_id = required(payload, "request_id")
    future = registry().future(request_id, g.owner)
    waiting, result = poll_answer(future, request_id, current_app.config["SETTINGS"].poll_timeout_s)
    if waiting is not None:
        return waiting
    kind = future["kind"]
    if kind in PROTO_KINDS and proto.PROTO_CONTENT_TYPE in request.headers.get("Accept", ""):
        data = proto.sample_response(result) if kind == "sample" else proto.forward_backward_output(result)
        return Response(data, content_type=proto.PROTO_CONTENT_TYPE)
    answer = result_json(kind, result)
    if kind in ("forward", "forward_backward"):
        answer["metrics"] = {proto.metric_key(k): v for k, v in answer["metrics"].items()}
    if isinstance(answer, dict):
        answer = {k: v for k, v in answer.items() if v is not None and k != "error"}
    return jsonify(answer)
