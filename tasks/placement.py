"""Adapters without a live holder: parked when their session idles or ends, taken from workers that died for good,
and restored from their last autosave (weights and optimizer state) wherever they are placed next.

The registry decides who holds an adapter (core/registry.py, fenced by an epoch); this module is the worker's side:
the park and restore tasks, and the sweep each worker runs every TINKERBELL_SWEEP_S.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from tasks.celery_app import adapter_queue, app
from tasks.engine import CALL, NOT_RUN, Work
from tasks.runtime import runtime
from tasks.training import autosave_dir, autosaver, restore_adapter, write_autosave

log = logging.getLogger("tinkerbell.placement")


def park(model_id: str, reason: str) -> bool:
    """Save the adapter's state (the autosave, with optimizer state) and free its memory here, if this worker holds
    it and every request admitted for it has run; the registry then lists it as parked. False when it stays."""
    epoch = runtime.epochs.get(model_id)
    if epoch is None:
        return False

    def give_up() -> bool:  # engine thread: no request of this adapter runs meanwhile
        if runtime.engine.held(model_id) or not runtime.training.has_adapter(model_id):
            return False
        autosaver.wait(model_id)
        runtime.flush_after_result()  # applied_seq and gradients_since as they are now, before the registry moves it
        applied = runtime._registry_applied_seq(model_id)
        if not runtime.settings.autosave or not autosave_dir(model_id).exists():  # else it is current already
            write_autosave(model_id, None)  # the copy in memory is about to go: the file is all that is left
        outcome = runtime.registry.park(model_id, runtime.name, epoch, applied, reason)
        if outcome != 1:
            return False
        runtime.training.remove_adapter(model_id)
        runtime.engine.base_of.pop(model_id, None)
        runtime.forget_adapter(model_id)
        return True

    parked = bool(runtime.engine.run(Work(CALL, give_up, model_id)))
    if parked:
        runtime.engine.forget(model_id)
        runtime.release_adapter(model_id)
        log.info("parked %s (%s): state saved, memory freed", model_id, reason)
    return parked


@app.task(name="tinkerbell.park_adapter")
def park_adapter(model_id: str) -> dict[str, Any]:
    """Park now (the session was finished); if requests are still to run, the sweep parks it once they have."""
    return {"model_id": model_id, "parked": park(model_id, "session finished")}


@app.task(name="tinkerbell.restore_adapter")
def restore_placed_adapter(model_id: str, epoch: int) -> dict[str, Any]:
    """The registry placed a parked adapter here with `epoch`: restore it from its autosave, put back what a dead
    holder had taken from its queue and not finished, then consume the queue (its waiting requests run here)."""
    record = runtime.registry.model_any(model_id)
    if not record or record.get("deleted") or record.get("worker") != runtime.name or record.get("epoch") != epoch:
        return {"model_id": model_id, "restored": False}  # placed again since (this message is stale)
    restore = [adapter_queue(model_id)] if record.get("taken_from") else []
    restore_adapter(model_id, record, restore_unacked=restore, before_consuming=_fail_lost_requests)
    runtime.registry.update_owned(
        model_id, runtime.name, epoch, status="ready", taken_from=None, last_request_time=time.time()
    )
    return {"model_id": model_id, "restored": True}


def _fail_lost_requests(model_id: str, record: dict[str, Any]) -> None:
    """A dead holder may have taken a message off the queue and died before kombu recorded it as unacked (Redis
    BRPOP, then the record): that request is nowhere now. Each admitted request after applied_seq with no stored
    result that is in neither the outbox nor the queue fails with an error saying so (the engine then does not wait
    for it). Runs before this worker consumes the queue, after the dead holder's unacked messages were put back."""
    if not record.get("taken_from"):
        return
    from core.errors import UserError
    from core.registry import OUTBOX

    admitted = runtime.registry.admitted_between(model_id, runtime._registry_applied_seq(model_id), 2**31)
    real = {seq: rid for seq, rid in admitted.items() if not rid.startswith(NOT_RUN)}
    if not real:
        return
    backend = runtime.celery.backend
    stored = [bool(backend.client.exists(backend.get_key_for_task(rid))) for rid in real.values()]
    pending = runtime.registry.redis.hkeys(f"tb:seq:{model_id}:pending")  # held behind a gap: not released yet
    with runtime.celery.connection_for_write() as connection, connection.default_channel.conn_or_acquire() as client:
        queued = {json.loads(raw).get("headers", {}).get("id") for raw in client.lrange(adapter_queue(model_id), 0, -1)}
    for (seq, rid), done in zip(real.items(), stored):
        if done or str(seq) in pending or runtime.registry.redis.hexists(OUTBOX, rid) or rid in queued:
            continue
        log.warning("%s: seq_id %d (%s) was lost with worker %s", model_id, seq, rid, record["taken_from"])
        backend.mark_as_failure(
            rid,
            UserError(
                f"seq_id {seq} of {model_id} was lost when worker {record['taken_from']} died before running it; "
                "nothing of it was applied: send it again"
            ),
        )


def sweep() -> None:
    """Park this worker's adapters whose session idled past TINKERBELL_SESSION_IDLE_S or was finished; take the
    adapters of workers whose heartbeat is missed past TINKERBELL_WORKER_DEAD_S (they are parked, and placed again
    on their next request)."""
    settings = runtime.settings
    for model_id, reason in runtime.registry.idle_models(sorted(runtime.epochs), settings.session_idle_s).items():
        try:
            park(model_id, reason)
        except Exception:
            log.exception("could not park %s", model_id)
    for dead in runtime.registry.dead_workers(settings.worker_dead_s):
        if dead == runtime.name:
            continue
        for model_id in runtime.registry.worker_adapters(dead):
            if runtime.registry.take_over(model_id, dead):
                log.warning(
                    "worker %s missed its heartbeat for %g s: %s is parked", dead, settings.worker_dead_s, model_id
                )
