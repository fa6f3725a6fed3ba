"""Custom losses on the API: upload (POST /register_custom_loss), inspect and delete, and name -> version resolution.

Code is stored per owner in Redis (metadata by name, the dill payload by content hash); workers load it by hash.
Uploading is arbitrary code execution on the workers, so it needs TINKERBELL_ALLOW_CUSTOM_CODE=1 and the key's
custom_code scope.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from typing import Any

from flask import Blueprint, current_app, g, has_request_context, jsonify
from werkzeug.exceptions import Forbidden

from api.jsonwire import body
from core.errors import NotFound, UserError
from core.registry import Registry
from core.settings import Settings

bp = Blueprint("custom_losses", __name__)

NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")
MAX_CODE_BYTES = 4 * 1024 * 1024
MAX_TEXT_CHARS = 64 * 1024  # signature, docstring, source
SCOPE = "custom_code"

BUILTIN_KEY = "tb:losses:builtin"
CUSTOM_KEY = "tb:losses:custom:{owner}"  # name -> JSON metadata of the current version
VERSIONS_KEY = "tb:losses:versions:{owner}"  # name -> last version number (never reused)
HISTORY_KEY = "tb:losses:history:{owner}:{name}"  # version -> JSON metadata
CODE_KEY = "tb:losses:code:{digest}"  # content hash -> base64 dill payload (read by tasks/custom_losses.py)
META_KEY = "tb:losses:meta:{digest}"  # content hash -> JSON {source, filename, first_line, python}

DISABLED = (
    "custom losses are disabled on this service: uploading one runs arbitrary code on the GPU workers. "
    "An operator enables it by starting the API and every worker with TINKERBELL_ALLOW_CUSTOM_CODE=1, "
    "then granting trusted keys the custom_code scope: `python -m api.keys grant KEY_ID custom_code` "
    "(or `python -m api.keys create --name NAME --scope custom_code`). See CUSTOM_LOSS_GUIDE.md."
)
NO_SCOPE = (
    "this API key lacks the custom_code scope needed to upload or run custom losses (arbitrary code on the workers). "
    "An operator grants it with `python -m api.keys grant KEY_ID custom_code` "
    "(or creates a key with `python -m api.keys create --name NAME --scope custom_code`). See CUSTOM_LOSS_GUIDE.md."
)


def check_allowed(settings: Settings, scopes: set[str]) -> None:
    """403 unless the service allows custom code and this key has the scope (single-user mode has it)."""
    if not settings.allow_custom_code:
        raise Forbidden(DISABLED)
    if SCOPE not in scopes:
        raise Forbidden(NO_SCOPE)


def custom_loss_name(loss_fn: str, loss_fn_config: dict[str, Any] | None) -> str:
    """The loss name a training request asks for: loss_fn, or loss_fn_config.loss_id when loss_fn is "custom"."""
    if loss_fn != "custom":
        return loss_fn
    name = (loss_fn_config if isinstance(loss_fn_config, dict) else {}).get("loss_id")
    if not isinstance(name, str) or not name:
        raise UserError("loss_fn_config.loss_id: required (the name of an uploaded loss) when loss_fn is 'custom'")
    return name


def resolve_custom_loss(
    settings: Settings, owner: str, loss_fn: str, name: str, builtin: bool, custom_meta: str | None
) -> dict[str, Any] | None:
    """The owner's current version of custom loss `name` (custom_loss_name), looked up by the caller.

    Returns {name, version, hash, owner} for the task, fixed now so a later re-registration changes the next
    request and not this one; None when the name is not one of the owner's custom losses. Running one needs
    what uploading needs (checked against the requesting key's scopes).
    """
    if builtin:
        if loss_fn == "custom":
            raise UserError(f"loss_fn_config.loss_id: {name!r} is a built-in loss; pass loss_fn={name!r} instead")
        return None
    if custom_meta is None:
        if loss_fn == "custom":
            raise UserError(f"loss_fn_config.loss_id: you have no custom loss {name!r}; see GET /list_loss_functions")
        return None
    check_allowed(settings, g.scopes if has_request_context() else set())
    meta = json.loads(custom_meta)
    return {"name": name, "version": meta["version"], "hash": meta["hash"], "owner": owner}


def _text(payload: dict[str, Any], field: str) -> str:
    value = payload.get(field) or ""
    if not isinstance(value, str):
        raise UserError(f"{field}: must be a string")
    if len(value) > MAX_TEXT_CHARS:
        raise UserError(f"{field}: longer than {MAX_TEXT_CHARS} characters")
    return value


def _decode_code(value: Any) -> bytes:
    if not isinstance(value, str) or not value:
        raise UserError(
            "code: required, the base64 of the dill-serialized function (the client's @custom_loss makes it)"
        )
    if len(value) > MAX_CODE_BYTES * 4 // 3 + 4:
        raise UserError(
            f"code: larger than {MAX_CODE_BYTES // (1024 * 1024)} MiB; a loss should not carry data (pass it in "
            "loss_fn_inputs)"
        )
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise UserError("code: not valid base64") from None


def _registry() -> Registry:
    return current_app.config["REGISTRY"]


@bp.post("/register_custom_loss")
@bp.post("/api/v1/register_custom_loss")
def register_custom_loss():
    """Store a new version of one of the caller's losses; identical code keeps the current version."""
    check_allowed(current_app.config["SETTINGS"], g.scopes)
    payload = body()
    name = payload.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name == "custom":
        raise UserError(
            f"name: {name!r} must be 1-64 letters, digits, '_', '.' or '-', start with a letter or '_', and not be "
            "'custom'"
        )
    redis = _registry().redis
    if redis.hexists(BUILTIN_KEY, name):
        raise UserError(f"name: {name!r} is a built-in loss; choose another name")
    code = _decode_code(payload.get("code"))
    digest = hashlib.sha256(code).hexdigest()
    source = _text(payload, "source")
    meta = {
        "source": source,
        "filename": _text(payload, "filename"),
        "first_line": payload.get("first_line") if isinstance(payload.get("first_line"), int) else None,
        "python": _text(payload, "python"),
    }
    config = payload.get("config") if isinstance(payload.get("config"), dict) else {}
    custom_key, owner = CUSTOM_KEY.format(owner=g.owner), g.owner
    with redis.lock(f"tb:losses:lock:{owner}:{name}", timeout=10, blocking_timeout=10):
        current = redis.hget(custom_key, name)
        if current is not None and json.loads(current)["hash"] == digest:
            return jsonify({**json.loads(current), "unchanged": True})
        redis.set(CODE_KEY.format(digest=digest), base64.b64encode(code).decode())
        redis.set(META_KEY.format(digest=digest), json.dumps(meta))
        version = int(redis.hincrby(VERSIONS_KEY.format(owner=owner), name, 1))
        record = {
            "name": name,
            "version": version,
            "hash": digest,
            "builtin": False,
            "custom": True,
            "signature": _text(payload, "signature") or name,
            "docstring": _text(payload, "docstring"),
            "required_inputs": ["target_tokens"],
            "optional_inputs": [],
            "config": config,
            "metrics": ["loss:sum"],
            "size_bytes": len(code),
            "python": meta["python"],
            "created": time.time(),
        }
        encoded = json.dumps(record)
        redis.hset(HISTORY_KEY.format(owner=owner, name=name), str(version), encoded)
        redis.hset(custom_key, name, encoded)
    return jsonify({**record, "unchanged": False})


@bp.get("/custom_losses/<name>")
@bp.get("/api/v1/custom_losses/<name>")
def get_custom_loss(name: str):
    """The caller's loss: current metadata, its source (when uploaded) and every version's metadata."""
    redis = _registry().redis
    raw = redis.hget(CUSTOM_KEY.format(owner=g.owner), name)
    if raw is None:
        raise NotFound(f"name: you have no custom loss {name!r}")
    record = json.loads(raw)
    meta = json.loads(redis.get(META_KEY.format(digest=record["hash"])) or "{}")
    history = redis.hgetall(HISTORY_KEY.format(owner=g.owner, name=name))
    versions = sorted((json.loads(v) for v in history.values()), key=lambda r: r["version"])
    return jsonify({**record, "source": meta.get("source", ""), "versions": versions})


@bp.delete("/custom_losses/<name>")
@bp.delete("/api/v1/custom_losses/<name>")
def delete_custom_loss(name: str):
    """Forget the name (requests already queued still run the version they were given)."""
    if not _registry().redis.hdel(CUSTOM_KEY.format(owner=g.owner), name):
        raise NotFound(f"name: you have no custom loss {name!r}")
    return jsonify(name=name, deleted=True)
