"""The Tinker REST surface: training runs, checkpoints (list, delete, publish, TTL), sessions, and signed downloads.

Checkpoint ids contain a slash (`weights/step1`), so routes use `<path:checkpoint_id>`. Download links are
HMAC-signed and expire; the API serves the files itself, unauthenticated, as `tinker checkpoint download` expects.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from flask import Blueprint, current_app, g, jsonify, request, send_file

from api import validate
from api.auth import public
from api.jsonwire import body
from core.errors import NotFound, QuotaExceeded, UserError
from core.registry import Registry

rest_bp = Blueprint("tinker_rest", __name__)

MAX_PAGE = 1000  # items per listing page; limit=0 asks for this many
CHECKPOINT_TYPES = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}


def registry() -> Registry:
    return current_app.config["REGISTRY"]


def iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(float(timestamp), UTC).isoformat()


def checkpoint_json(record: dict[str, Any]) -> dict[str, Any]:
    """tinker.types.Checkpoint."""
    return {
        "checkpoint_id": record["checkpoint_id"],
        "checkpoint_type": record["checkpoint_type"],
        "time": iso(record["time"]),
        "tinker_path": record["tinker_path"],
        "size_bytes": record.get("size_bytes"),
        "public": bool(record.get("public")),
        "expires_at": iso(record.get("expires_at")),
    }


def listed(model_id: str) -> list[dict[str, Any]]:
    """A run's checkpoints as users see them: ephemeral sampler snapshots are internal."""
    return [c for c in registry().checkpoints(model_id) if not c.get("ephemeral")]


def _page() -> tuple[int, int]:
    try:
        limit = int(request.args.get("limit", 20))
        offset = int(request.args.get("offset", 0))
    except ValueError:
        raise UserError("limit/offset: must be integers") from None
    if not (0 <= limit <= MAX_PAGE and 0 <= offset <= validate.INT32_MAX):
        raise UserError(f"limit/offset: limit must be in 0..{MAX_PAGE} and offset in 0..{validate.INT32_MAX}")
    return limit or MAX_PAGE, offset


def _training_run(model_id: str) -> dict[str, Any]:
    """tinker.types.TrainingRun for one of the caller's models."""
    model = registry().model(model_id, g.owner)

    def last(path_field: str) -> dict[str, Any] | None:
        path = model.get(path_field)
        if not path:
            return None
        record = registry().checkpoint(model_id, path[len("tinker://") :].split("/", 1)[-1])
        return checkpoint_json(record) if record and not record.get("ephemeral") else None

    return {
        "training_run_id": model_id,
        "base_model": model["base_model"],
        "model_owner": model["owner"],
        "is_lora": True,
        "corrupted": model.get("status") == "failed",
        "lora_rank": model["lora"]["rank"],
        "last_request_time": iso(model.get("last_request_time") or model["created"]),
        "last_checkpoint": last("last_checkpoint"),
        "last_sampler_checkpoint": last("last_sampler_checkpoint"),
        "user_metadata": {str(k): str(v) for k, v in (model.get("user_metadata") or {}).items()} or None,
    }


@rest_bp.get("/training_runs")
def list_training_runs():
    limit, offset = _page()
    model_ids, total = registry().list_models(g.owner, offset, limit)
    runs = [_training_run(m) for m in model_ids]
    return jsonify(training_runs=runs, cursor={"offset": offset, "limit": limit, "total_count": total})


@rest_bp.get("/training_runs/<run_id>")
def get_training_run(run_id: str):
    return jsonify(_training_run(run_id))


@rest_bp.get("/training_runs/<run_id>/checkpoints")
def list_run_checkpoints(run_id: str):
    registry().model(run_id, g.owner)
    items = [checkpoint_json(c) for c in listed(run_id)]
    return jsonify(checkpoints=items, cursor={"offset": 0, "limit": len(items), "total_count": len(items)})


@rest_bp.get("/checkpoints")
def list_user_checkpoints():
    limit, offset = _page()
    model_ids, _ = registry().list_models(g.owner, 0, 100_000)
    items = sorted((c for m in model_ids for c in listed(m)), key=lambda c: c["time"], reverse=True)
    page = [checkpoint_json(c) for c in items[offset : offset + limit]]
    return jsonify(checkpoints=page, cursor={"offset": offset, "limit": limit, "total_count": len(items)})


def owned_checkpoint(run_id: str, checkpoint_id: str) -> dict[str, Any]:
    registry().model(run_id, g.owner)
    kind = checkpoint_id.split("/", 1)[0]
    if kind not in CHECKPOINT_TYPES or "/" not in checkpoint_id:
        raise UserError(
            f"checkpoint_id: must look like <weights|sampler_weights|external_weights>/<name>, got {checkpoint_id!r}"
        )
    record = registry().checkpoint(run_id, checkpoint_id)
    if record is None or (record.get("expires_at") and record["expires_at"] <= time.time()):
        raise NotFound(f"checkpoint_id: no checkpoint {checkpoint_id} in training run {run_id}")
    return record


@rest_bp.delete("/training_runs/<run_id>/checkpoints/<path:checkpoint_id>")
def delete_checkpoint(run_id: str, checkpoint_id: str):
    record = owned_checkpoint(run_id, checkpoint_id)
    registry().delete_checkpoint(run_id, checkpoint_id)
    data_root = current_app.config["SETTINGS"].data_path
    directory = Path(record["dir"])
    if directory.resolve().is_relative_to(data_root):  # never remove anything outside the data directory
        shutil.rmtree(directory, ignore_errors=True)
    return jsonify(deleted=record["tinker_path"])


@rest_bp.route("/training_runs/<run_id>/checkpoints/<path:checkpoint_id>/publish", methods=["POST", "DELETE"])
def publish_checkpoint(run_id: str, checkpoint_id: str):
    if (
        "/" not in checkpoint_id and request.method == "DELETE"
    ):  # DELETE …/checkpoints/weights/publish: a checkpoint named "publish"
        return delete_checkpoint(run_id, f"{checkpoint_id}/publish")
    record = owned_checkpoint(run_id, checkpoint_id)
    record["public"] = request.method == "POST"
    registry().add_checkpoint(run_id, record)
    return jsonify(checkpoint_json(record))


@rest_bp.put("/training_runs/<run_id>/checkpoints/<path:checkpoint_id>/ttl")
def set_checkpoint_ttl(run_id: str, checkpoint_id: str):
    """Body {"ttl_seconds": seconds, or null to keep it forever}; any other body is refused, never read as null."""
    payload = body()
    if "ttl_seconds" not in payload:
        raise UserError('body: must be {"ttl_seconds": <seconds> | null}')
    ttl = validate.ttl_seconds(payload["ttl_seconds"])
    record = owned_checkpoint(run_id, checkpoint_id)
    record["expires_at"] = time.time() + ttl if ttl else None
    registry().add_checkpoint(run_id, record)
    return jsonify(checkpoint_json(record))


# ---- copy_weights -------------------------------------------------------------------------------
COPY_IDEMPOTENCY_S = 86400


@rest_bp.post("/copy_weights")
def copy_weights():
    """Copy a checkpoint the caller may read (its own, or a public one) into a new run of the caller's that holds
    only that checkpoint and cannot be trained on. The files are hard links (no bytes duplicated; deleting either
    side leaves the other whole). The SDK's X-Idempotency-Key makes a resend answer the first copy's path."""
    payload = request.get_json(force=True, silent=True)
    if not isinstance(payload, dict):
        raise UserError("body: must be a JSON object with source_path")
    settings = current_app.config["SETTINGS"]
    service = current_app.config["SERVICE"]
    source = service.resolve_checkpoint(g.owner, payload.get("source_path"))
    ttl = validate.ttl_seconds(payload.get("ttl_seconds"))
    key = request.headers.get("X-Idempotency-Key")
    redis = registry().redis
    idem = f"tb:copy_idem:{hashlib.sha256(f'{g.owner}|{key}'.encode()).hexdigest()}"
    if key:
        done = redis.get(idem)
        if done:
            return jsonify(tinker_path=done)
    kind, name = source["checkpoint_id"].split("/", 1)
    run_id = f"copy-{secrets.token_hex(8)}"
    target = settings.data_path / "checkpoints" / run_id / kind / name
    if not Path(source["dir"]).is_dir():
        raise NotFound(f"source_path: checkpoint {payload.get('source_path')} has no files (was it deleted?)")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(source["dir"], target, copy_function=os.link)
    except OSError:  # another filesystem: a real copy
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source["dir"], target)
    now = time.time()
    path = f"tinker://{run_id}/{kind}/{name}"
    record = {
        **{k: source.get(k) for k in ("checkpoint_type", "size_bytes", "base_model", "lora")},
        "checkpoint_id": source["checkpoint_id"],
        "time": now,
        "tinker_path": path,
        "dir": str(target),
        "public": False,
        "expires_at": now + ttl if ttl else None,
        "owner": g.owner,
        "ephemeral": False,
        "copied_from": source["tinker_path"],
    }
    try:
        registry().add_checkpoint(run_id, record, limited=True)  # the copy's bytes are the caller's to store
    except QuotaExceeded:
        shutil.rmtree(target.parent.parent, ignore_errors=True)
        raise
    if key and not redis.set(idem, path, nx=True, ex=COPY_IDEMPOTENCY_S):  # a concurrent resend won: answer its copy
        registry().delete_checkpoint(run_id, source["checkpoint_id"])
        shutil.rmtree(target.parent.parent, ignore_errors=True)
        return jsonify(tinker_path=redis.get(idem))
    return jsonify(tinker_path=path)


# ---- signed downloads -------------------------------------------------------------------------
def _secret() -> bytes:
    """One signing secret per deployment, kept in Redis so every API process agrees on it."""
    key = "tb:download_secret"
    registry().redis.set(key, secrets.token_hex(32), nx=True)
    return registry().redis.get(key).encode()


def _signature(target: str, expires: int) -> str:
    return hmac.new(_secret(), f"{target}|{expires}".encode(), hashlib.sha256).hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


@rest_bp.get("/training_runs/<run_id>/checkpoints/<path:checkpoint_id>/external_weights_urls")
def external_weights_urls(run_id: str, checkpoint_id: str):
    """{urls: {relpath: signed url}, expires}; each url is a plain GET on this API for that one file, valid
    TINKERBELL_DOWNLOAD_LINK_TTL_S."""
    record = owned_checkpoint(run_id, checkpoint_id)
    if record["checkpoint_type"] == "sampler":
        raise UserError(
            "checkpoint_id: sampler checkpoints cannot be downloaded; save with save_weights_external "
            f"({checkpoint_id})"
        )
    directory = Path(record["dir"])
    if not directory.is_dir():
        raise NotFound(f"checkpoint_id: {checkpoint_id} has no files (was it deleted?)")
    settings = current_app.config["SETTINGS"]
    expires = int(time.time()) + settings.download_link_ttl_s
    base = settings.public_url.rstrip("/") or request.host_url.rstrip("/")
    urls = {}
    for relpath in _files(directory):
        target = f"{run_id}/{checkpoint_id}/{relpath}"
        urls[relpath] = (
            f"{base}/api/v1/download/{quote(target, safe='/:')}?expires={expires}&sig={_signature(target, expires)}"
        )
    return jsonify(urls=urls, expires=iso(expires))


@rest_bp.get("/download/<path:target>")
@public
def download(target: str):
    """Unauthenticated GET; the HMAC over (target, expiry) is the credential."""
    try:
        expires = int(request.args.get("expires", "0"))
    except ValueError:
        expires = 0
    signature = request.args.get("sig", "")
    if expires < time.time() or not hmac.compare_digest(signature, _signature(target, expires)):
        return jsonify(
            error="download link is invalid or has expired; ask for new external_weights_urls", category="user"
        ), 403
    parts = target.split("/", 3)
    if len(parts) != 4:
        raise NotFound("download: no such file")
    run_id, kind, name, relpath = parts
    record = registry().checkpoint(run_id, f"{kind}/{name}")
    if record is None or (record.get("expires_at") and record["expires_at"] <= time.time()):
        raise NotFound("download: the checkpoint was deleted or has expired")
    directory = Path(record["dir"]).resolve()
    path = (directory / relpath).resolve()
    if not path.is_relative_to(directory) or not path.is_file():
        raise NotFound("download: no such file")
    return send_file(path, mimetype="application/octet-stream", as_attachment=True, download_name=path.name)


# ---- sessions ---------------------------------------------------------------------------------
@rest_bp.get("/sessions")
def list_sessions():
    limit, offset = _page()
    session_ids, _ = registry().list_sessions(g.owner, offset, limit)
    return jsonify(sessions=session_ids)


@rest_bp.get("/sessions/<session_id>")
def get_session(session_id: str):
    session = registry().session(session_id, g.owner)
    metadata = {str(k): str(v) for k, v in (session.get("user_metadata") or {}).items()}
    return jsonify(
        training_run_ids=registry().session_children(session_id, "models"),
        sampler_ids=registry().session_children(session_id, "samplers"),
        user_metadata=metadata or None,
        display_name=session.get("display_name"),
    )
