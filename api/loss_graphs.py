"""Custom losses the SDK uploads as graphs: POST /api/v1/create_custom_loss, GET /api/v1/loss_graphs/<loss_id>, and
the loss_id -> graph resolution of forward_backward(loss_fn="custom", loss_fn_config={"loss_id"}).

A graph is data, checked here against the server's list of operations (core/loss_graph.py) and stored per API key;
no code is uploaded, so unlike the dill upload (api/custom_losses.py) it needs no operator switch or scope.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

from flask import Blueprint, current_app, g, jsonify

from api.jsonwire import body, required
from core import loss_graph
from core.errors import NotFound, UserError
from core.registry import Registry

bp = Blueprint("loss_graphs", __name__, url_prefix="/api/v1")
KIND = "create_custom_loss"


def _registry() -> Registry:
    return current_app.config["REGISTRY"]


@bp.post("/create_custom_loss")
def create_custom_loss():
    """tinker CreateCustomLossRequest -> a future whose result is {loss_id, type}. The id is a hash of the key and
    the checked graph, so a re-sent upload (the SDK retries) stores nothing new and answers the same id."""
    payload = body()
    settings, registry = current_app.config["SETTINGS"], _registry()
    session_id = required(payload, "session_id")
    registry.session(session_id, g.owner)
    spec = loss_graph.check_upload(
        payload.get("name"), payload.get("inputs"), payload.get("graph"), settings.loss_graph_max_nodes
    )
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    loss_id = loss_graph.loss_id_of(hashlib.sha256(f"{g.owner}\x00{canonical}".encode()).hexdigest())
    key = loss_graph.GRAPH_KEY.format(owner=g.owner, loss_id=loss_id)
    index = loss_graph.GRAPHS_KEY.format(owner=g.owner)
    if not registry.redis.exists(key):
        stored = int(registry.redis.zcard(index))
        if stored >= settings.loss_graphs_per_key:
            raise UserError(
                f"graph: this API key already stores {stored} custom-loss graphs, the limit "
                f"(TINKERBELL_LOSS_GRAPHS_PER_KEY={settings.loss_graphs_per_key})"
            )
        record = {
            "loss_id": loss_id,
            "name": spec["name"],
            "inputs": spec["inputs"],
            "graph": {"format": loss_graph.FORMAT, "nodes": spec["nodes"]},
            "session_id": session_id,
            "created": time.time(),
        }
        registry.redis.set(key, json.dumps(record))
        registry.redis.zadd(index, {loss_id: record["created"]})
    request_id = str(uuid.uuid4())
    registry.record_future(request_id, g.owner, KIND)
    current_app.config["SERVICE"].results.store_result(request_id, {"loss_id": loss_id, "type": KIND}, "SUCCESS")
    return jsonify(request_id=request_id)


@bp.get("/loss_graphs/<loss_id>")
def get_loss_graph(loss_id: str):
    """The caller's stored graph; any other key's is NotFound."""
    raw = _registry().redis.get(loss_graph.GRAPH_KEY.format(owner=g.owner, loss_id=loss_id))
    if raw is None:
        raise NotFound(f"loss_id: you have no custom loss {loss_id!r}")
    return jsonify(json.loads(raw))


def resolve_graph(registry: Registry, owner: str, loss_id: str) -> dict[str, Any]:
    """What a forward_backward task carries for the owner's graph loss_id: {owner, loss_id}; the worker reads the
    graph from the owner's own key, so no other key's id can reach it."""
    if not registry.redis.exists(loss_graph.GRAPH_KEY.format(owner=owner, loss_id=loss_id)):
        raise UserError(
            f"loss_fn_config.loss_id: you have no custom loss {loss_id!r}; create it with "
            "ServiceClient.create_custom_loss (uploaded losses belong to the API key that created them)"
        )
    return {"owner": owner, "loss_id": loss_id}
