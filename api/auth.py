"""API keys: `X-API-Key: tml-…` (or `Authorization: Bearer tml-…`) → g.owner and g.scopes.

With TINKERBELL_AUTH=off (single-user laptop mode) any `tml-` key, or none, acts as one local owner.
"""

from __future__ import annotations

from flask import current_app, g, jsonify, request

from core.registry import LOCAL_OWNER

PUBLIC_ENDPOINTS = {"static"}


def presented_key() -> str | None:
    key = request.headers.get("X-API-Key")
    if not key:
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            key = auth[7:].strip()
    return key or None


def authenticate():
    """before_request hook; views marked public (view.public = True) skip it."""
    view = current_app.view_functions.get(request.endpoint or "")
    if view is None or getattr(view, "public", False) or request.endpoint in PUBLIC_ENDPOINTS:
        return None
    key = presented_key()
    settings = current_app.config["SETTINGS"]
    if not settings.auth:
        if key is not None and not key.startswith("tml-"):
            return jsonify(error="X-API-Key: keys start with 'tml-'", category="user"), 401
        g.owner, g.scopes, g.key_name = LOCAL_OWNER, {"custom_code"}, "local"
        return None
    if key is None:
        return jsonify(
            error="X-API-Key: missing API key (create one with `python -m api.keys create --name NAME`)",
            category="user",
        ), 401
    record = current_app.config["REGISTRY"].lookup_key(key)
    if record is None:
        return jsonify(error="X-API-Key: unknown or revoked API key", category="user"), 401
    g.owner, g.scopes, g.key_name = record["key_id"], set(record.get("scopes", [])), record.get("name", "")
    return None


def public(view):
    """Mark a view as reachable without a key (health, metrics, signed downloads)."""
    view.public = True
    return view
