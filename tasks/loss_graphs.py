"""Worker side of graph losses (SDK create_custom_loss): read the owner's graph, check it again, rebuild it
(losses/graph.py) and register it in the loss registry under a per-owner name, once per worker.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import Any

from core import loss_graph
from core.errors import UserError
from core.settings import Settings
from losses import register_loss, unregister_loss
from losses.graph import GraphLoss

log = logging.getLogger("tinkerbell.loss_graphs")

CACHE_SIZE = 256  # rebuilt graphs kept per worker; the oldest leaves the loss registry
_loaded: OrderedDict[str, None] = OrderedDict()  # registry names, least recently used first
_lock = threading.Lock()  # pool threads load graphs concurrently


def registry_name(ref: dict[str, Any]) -> str:
    """e.g. 'graph/3fa2c1d9e0ab4b7c/0e1d…': a graph is immutable (its id is its hash), so the name never changes."""
    return f"graph/{ref['owner']}/{ref['loss_id'].removeprefix(loss_graph.LOSS_ID_PREFIX)}"


def load_graph_loss(ref: dict[str, Any], settings: Settings, redis: Any) -> str:
    """ref: {owner, loss_id}, resolved by api/ for the request's own key. Returns the loss registry name to run."""
    name = registry_name(ref)
    with _lock:
        if name in _loaded:
            _loaded.move_to_end(name)
            return name
    raw = redis.get(loss_graph.GRAPH_KEY.format(owner=ref["owner"], loss_id=ref["loss_id"]))
    if raw is None:
        raise UserError(f"loss_fn_config.loss_id: {ref['loss_id']!r} is not stored any more; create the loss again")
    record = json.loads(raw)
    spec = loss_graph.check_upload(record["name"], record["inputs"], record["graph"], settings.loss_graph_max_nodes)
    try:
        loss = GraphLoss(spec)
    except Exception as exc:  # noqa: BLE001 -- a checked upload torch.fx still refuses is the user's to fix
        raise UserError(f"custom loss {spec['name']!r}: torch.fx cannot rebuild its graph: {exc}") from None
    with _lock:
        register_loss(name, loss, doc=loss.__doc__, replace=True)
        _loaded[name] = None
        while len(_loaded) > CACHE_SIZE:
            old, _ = _loaded.popitem(last=False)
            unregister_loss(old)
    log.info("rebuilt custom loss %s (%s, %d nodes)", name, spec["name"], len(spec["nodes"]))
    return name
