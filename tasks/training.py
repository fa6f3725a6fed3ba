"""Training tasks: each runs on the worker that owns the adapter (queue adapter.<model_id>), in seq_id order.

A task body decodes wire data on its pool thread, hands the request to the worker's engine (tasks/engine.py), which
calls the TrainingBackend with other adapters' requests in the same pass, records what changed in the registry,
and returns plain data (arrays as bytes). A re-delivered request never trains twice (DESIGN rule 3).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery.exceptions import Reject

from backends.base import AdamSpec, Datum, FwdBwdRequest, LoraSpec
from core.errors import NotFound, QuotaExceeded, UserError
from core.wire import decode_datum, encode_array
from tasks.celery_app import app
from tasks.engine import CALL, FWD_BWD, OPTIM, Work
from tasks.runtime import runtime

log = logging.getLogger("tinkerbell.tasks")


def checkpoint_dir(model_id: str, kind: str, name: str) -> Path:
    return runtime.settings.data_path / "checkpoints" / model_id / kind / name


def autosave_dir(model_id: str) -> Path:
    return runtime.settings.data_path / "autosave" / model_id


def _require_adapter(model_id: str) -> None:
    if not runtime.training.has_adapter(model_id):
        raise NotFound(f"model_id: no adapter '{model_id}' on worker {runtime.name}")


def _ordered(
    model_id: str,
    seq_id: int | None,
    kind: str,
    payload: Any,
    tokens: int = 0,
    before: Callable[[], None] | None = None,
    after: Callable[[Any], dict[str, Any]] | None = None,
    undo: Callable[[], str] | None = None,
    limit: str = "TINKERBELL_STATE_TIME_LIMIT_S",
) -> dict[str, Any]:
    """Run one request of an adapter on the engine, in seq_id order, at most once per (model_id, seq_id).

    limit: the setting that bounds it (tasks.engine.Work.time_limit_s); undo(): puts the adapter back as it was
    before the request when its call ends past that limit (engine thread), returning what it did.

    A message redelivered after its result was stored is skipped by Celery itself (worker_deduplicate_successful_
    tasks); one applied but without a result fails. The adapter's background autosave (started by an optim_step,
    create or load) runs off the engine thread and is finished before this request's result is published: once a
    result is visible, the state it produced is on disk.
    """

    def check() -> None:  # on the engine thread, just before the request runs
        if seq_id is not None and seq_id <= runtime._registry_applied_seq(model_id):
            raise RuntimeError(
                f"seq_id {seq_id} of {model_id} was already applied; its result was lost when a worker stopped"
            )
        _require_adapter(model_id)
        if before is not None:
            before()

    def done(result: Any) -> dict[str, Any]:  # on the engine thread, right after it ran
        value = after(result) if after is not None else result
        fields: dict[str, Any] = {"last_request_time": time.time()}
        if seq_id is not None:
            fields["applied_seq"] = runtime.applied_seq[model_id] = seq_id
        runtime.after_result(model_id, **fields)
        return value

    hand_back_unless_held(model_id)
    work = Work(kind, payload, model_id, seq_id, tokens, check, done, undo=undo, **time_limit(limit))
    value = runtime.engine.run(work)
    autosaver.wait(model_id)  # on this pool thread: the engine goes on with other requests meanwhile
    return value


LIMITS = {
    "TINKERBELL_TRAIN_TIME_LIMIT_S": "train_time_limit_s",
    "TINKERBELL_OPTIM_TIME_LIMIT_S": "optim_time_limit_s",
    "TINKERBELL_STATE_TIME_LIMIT_S": "state_time_limit_s",
}


def time_limit(setting: str) -> dict[str, Any]:
    """Work's time_limit_s / limit_setting for the setting named."""
    return {"time_limit_s": getattr(runtime.settings, LIMITS[setting]) or None, "limit_setting": setting}


def _discard_gradients(model_id: str, seq_id: int | None) -> str:
    """Undo of a forward_backward: its gradients cannot be told from earlier ones, so all since the last optim_step
    go, and the next optim_step fails naming the first lost seq_id instead of stepping on part of the batch."""
    first = runtime.gradients_since.get(model_id, seq_id or 0)
    runtime.training.discard_gradients(model_id)
    _gradients_applied(model_id)
    runtime.lost_gradients[model_id] = first
    runtime.lost_reason[model_id] = "were discarded when one of them ran past its time limit"
    return f"the gradients accumulated since seq_id {first} are discarded; the next optim_step fails"


def _back_to_autosave(model_id: str) -> str:
    """Undo of a request that changed weights or optimizer state: the autosave is the state from before it (it is
    written after every optim_step, create and load, and this request's own autosave never started)."""
    saved = autosave_dir(model_id)
    autosaver.wait(model_id)
    if not saved.exists():
        runtime.registry.update_model(model_id, status="failed")
        return "it could not be undone (no autosave: TINKERBELL_AUTOSAVE is off), so the adapter is marked failed"
    runtime.training.load_state(model_id, str(saved), True)
    runtime.training.discard_gradients(model_id)
    if runtime.gradients_since.get(model_id) is not None:
        runtime.lost_gradients[model_id] = runtime.gradients_since[model_id]
        runtime.lost_reason[model_id] = "were used by an optim_step that ran past its time limit and was undone"
    return "the adapter is back at its state from before this request"


def hand_back_unless_held(model_id: str) -> None:
    """A request for an adapter this worker no longer holds (parked, or moved while this worker was away) goes back
    to the queue for its holder: this worker drops its copy, stops consuming the queue and runs nothing."""
    if runtime.holds(model_id):
        return
    if model_id in runtime.epochs or runtime.training.has_adapter(model_id):
        log.warning("%s is no longer held by %s: dropping this worker's copy", model_id, runtime.name)
        release_here(model_id)
    else:
        runtime.release_adapter(model_id)
    raise Reject(f"{model_id} is not held by {runtime.name}", requeue=True)


def release_here(model_id: str) -> None:
    """Free the adapter's memory on this worker and stop consuming its queue (pool thread)."""

    def drop() -> None:
        if runtime.training.has_adapter(model_id):
            runtime.training.remove_adapter(model_id)
        runtime.engine.base_of.pop(model_id, None)
        runtime.forget_adapter(model_id)

    runtime.engine.run(Work(CALL, drop, model_id))
    runtime.engine.forget(model_id)
    runtime.release_adapter(model_id)


AUTOSAVE_INFO = "tinkerbell-autosave.json"
LOST_WITH_WORKER = "were lost when a worker stopped (the adapter came back from its state after the last optim_step)"


def write_autosave(model_id: str, seq_id: int | None) -> None:
    if not runtime.holds(model_id):  # fenced: an old holder never overwrites the new one's autosave
        log.warning("not writing the autosave of %s: %s no longer holds it", model_id, runtime.name)
        return
    target = autosave_dir(model_id)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    runtime.training.save_state(model_id, str(tmp), True)
    (tmp / AUTOSAVE_INFO).write_text(json.dumps({"seq_id": seq_id, "time": time.time()}))  # the request it includes
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # a crash mid-write leaves the previous autosave whole


class Autosaver:
    """Keeps each adapter's latest state on disk so a restarted worker restores it (nothing lost).

    Writes run in a background thread so training does not wait for the disk: forward/backward only reads the
    weights and may overlap the write; whatever changes weights or optimizer state waits for it first.
    """

    def __init__(self) -> None:
        self._writes: dict[str, threading.Thread] = {}
        self._errors: dict[str, BaseException] = {}
        self._lock = threading.Lock()  # start() runs on the engine thread, wait() on pool threads too

    def start(self, model_id: str, seq_id: int | None = None) -> None:
        """Write the adapter's state as it is now (after request seq_id, when one changed it) in the background."""
        if not runtime.settings.autosave:
            return
        self.wait(model_id)
        thread = threading.Thread(target=self._run, args=(model_id, seq_id), name=f"autosave {model_id}")
        with self._lock:  # started before it is visible: wait() may join it from a pool thread at once
            thread.start()
            self._writes[model_id] = thread

    def _run(self, model_id: str, seq_id: int | None) -> None:
        try:
            write_autosave(model_id, seq_id)
        except Exception as exc:  # noqa: BLE001 - a thread must not die silently; wait() reports it on the task thread
            self._errors[model_id] = exc

    def wait(self, model_id: str) -> None:
        with self._lock:
            thread = self._writes.get(model_id)
        if thread is not None:
            thread.join()
            with self._lock:
                if self._writes.get(model_id) is thread:
                    del self._writes[model_id]
        error = self._errors.pop(model_id, None)
        if error is not None:
            log.error("autosave of %s failed: %r", model_id, error)


autosaver = Autosaver()


def restore_adapter(
    model_id: str,
    record: dict[str, Any],
    restore_unacked: list[str] | None = None,
    before_consuming: Callable[[str, dict[str, Any]], None] | None = None,
) -> None:
    """Re-create an adapter from its latest autosave (weights and optimizer state) if any: one this worker held
    before it restarted, or one placed here after it was parked or taken from a dead worker. record: the model's
    registry record, read after it was placed here (its epoch is the one this worker holds it with).
    restore_unacked: queues whose unacked messages (a dead holder's) go back to the front before consuming."""
    runtime.hold(model_id, int(record.get("epoch") or 0))

    def restore() -> None:
        if runtime.training.has_adapter(model_id):  # a stale copy from an earlier hold
            runtime.training.remove_adapter(model_id)
        runtime.training.create_adapter(model_id, record["base_model"], LoraSpec(**record["lora"]))
        runtime.engine.base_of[model_id] = record["base_model"]
        saved, saved_seq = autosave_dir(model_id), 0
        if saved.exists():
            runtime.training.load_state(model_id, str(saved), True)
            info = json.loads((saved / AUTOSAVE_INFO).read_text()) if (saved / AUTOSAVE_INFO).exists() else {}
            saved_seq = int(info.get("seq_id") or 0)
            log.info("restored %s from %s (state after seq_id %d)", model_id, saved, saved_seq)
        else:
            log.warning("restored %s with fresh weights: no autosave found", model_id)
        # The autosave may hold a request whose result was never stored (its holder died in between): it counts as
        # applied, so a redelivery is refused ("already applied") rather than applied twice.
        runtime.applied_seq[model_id] = max(int(record.get("applied_seq") or 0), saved_seq)
        lost = record.get("gradients_since")
        if lost is not None and int(lost) > saved_seq:  # forward_backward results answered, never stepped on: gone
            runtime.gradients_since[model_id] = runtime.lost_gradients[model_id] = int(lost)
            log.warning(
                "%s: gradients accumulated since seq_id %s were lost with the previous holder; its next optim_step "
                "fails",
                model_id,
                lost,
            )

    runtime.engine.run(Work(CALL, restore, model_id))
    if restore_unacked:
        from tasks.broker import restore_own_unacked

        with runtime.celery.connection_for_write() as connection:
            restored = restore_own_unacked(connection, set(restore_unacked))
        if restored:
            log.warning("%s: put back %d request(s) its dead holder had taken: %s", model_id, len(restored), restored)
    if before_consuming is not None:
        before_consuming(model_id, record)
    runtime.serve_base_model(record["base_model"])
    runtime.own_adapter(model_id)


@app.task(name="tinkerbell.create_adapter", throws=(UserError,))
def create_adapter(
    model_id: str, base_model: str, lora: dict[str, Any], load_path: str | None = None, with_optimizer: bool = False
) -> dict[str, Any]:
    """Create (or, with load_path, restore from a checkpoint dir) an adapter here and start consuming its queue."""
    runtime.check_served(base_model)

    placement = runtime.registry.placement(model_id)
    if placement is not None and placement.worker != runtime.name:  # moved on while this message waited
        return {"model_id": model_id}
    runtime.epochs.setdefault(model_id, placement.epoch if placement else 0)

    def create() -> None:
        if not runtime.training.has_adapter(model_id):
            runtime.training.create_adapter(model_id, base_model, LoraSpec(**lora))
            if load_path:
                runtime.training.load_state(model_id, load_path, with_optimizer)
        runtime.engine.base_of[model_id] = base_model
        autosaver.start(model_id)

    def undo() -> str:
        autosaver.wait(model_id)
        if runtime.training.has_adapter(model_id):
            runtime.training.remove_adapter(model_id)
        runtime.engine.base_of.pop(model_id, None)
        runtime.registry.update_model(model_id, status="failed")
        return "the adapter is not created"

    create.__name__ = "create_adapter"
    runtime.engine.run(Work(CALL, create, model_id, undo=undo, **time_limit("TINKERBELL_STATE_TIME_LIMIT_S")))
    autosaver.wait(model_id)
    runtime.serve_base_model(base_model)
    runtime.own_adapter(model_id)
    runtime.registry.update_owned(
        model_id, runtime.name, runtime.epochs[model_id], status="ready", last_request_time=time.time()
    )
    return {"model_id": model_id}


@app.task(name="tinkerbell.remove_adapter", throws=(UserError,))
def remove_adapter(model_id: str, seq_id: int | None = None) -> dict[str, Any]:
    """Runs in order after everything queued before it on the adapter's queue, then stops that queue."""

    def remove() -> dict[str, Any]:
        autosaver.wait(model_id)
        if runtime.training.has_adapter(model_id):
            runtime.training.remove_adapter(model_id)
        runtime.engine.base_of.pop(model_id, None)
        return {"model_id": model_id, "removed": True}

    def check() -> None:
        if seq_id is not None and seq_id <= runtime._registry_applied_seq(model_id):
            raise RuntimeError(f"seq_id {seq_id} of {model_id} was already applied")

    remove.__name__ = "remove_adapter"
    work = Work(CALL, remove, model_id, seq_id, before=check, **time_limit("TINKERBELL_STATE_TIME_LIMIT_S"))
    result = runtime.engine.run(work)
    runtime.engine.forget(model_id)
    runtime.release_adapter(model_id)
    runtime.registry.delete_model(model_id)
    shutil.rmtree(autosave_dir(model_id), ignore_errors=True)
    return result


@app.task(name="tinkerbell.forward_backward", throws=(UserError,))
def forward_backward(
    model_id: str,
    seq_id: int | None,
    data: list[dict[str, Any]],
    loss_fn: str = "cross_entropy",
    loss_fn_config: dict[str, Any] | None = None,
    forward_only: bool = False,
    custom_loss: dict[str, Any] | None = None,
    loss_graph: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """custom_loss: {name, version, hash, owner} of the owner's uploaded loss, resolved by api/ at publish time.
    loss_graph: {owner, loss_id} of the owner's graph loss (SDK create_custom_loss), resolved the same way.

    The message is decoded here, on the pool thread; the engine runs it in one pass with other adapters' requests.
    """
    from tasks import custom_losses, loss_graphs

    datums = [Datum(*decode_datum(d)) for d in data]
    if loss_graph is not None:
        loss_name = loss_graphs.load_graph_loss(loss_graph, runtime.settings, runtime.registry.redis)
        loss_fn_config = {}  # only the loss_id, which named the graph
    else:
        loss_name = custom_losses.resolve_loss_fn(loss_fn, custom_loss, runtime.settings, runtime.registry.redis)
    request = FwdBwdRequest(model_id, datums, loss_name, dict(loss_fn_config or {}), forward_only)
    tokens = sum(len(d.tokens) for d in datums)

    def after(result: Any) -> dict[str, Any]:
        runtime.after_result(stats={"tokens_trained" if not forward_only else "tokens_forward": tokens})
        if not forward_only and model_id not in runtime.gradients_since:
            # The first forward_backward since optim_step: the registry learns that gradients are pending before its
            # result can be seen (once per step), so a restarted worker knows what it lost.
            if not runtime.registry.update_owned(
                model_id, runtime.name, runtime.epochs.get(model_id, 0), gradients_since=seq_id or 0
            ):
                raise RuntimeError(f"{model_id} moved off {runtime.name} while this request ran; send it again")
            runtime.gradients_since[model_id] = seq_id or 0
        return {
            "loss_fn_output_type": "ArrayRecord",
            "loss_fn_outputs": [
                {k: encode_array(v, "float32") for k, v in out.items()} for out in result.loss_fn_outputs
            ],
            "metrics": result.metrics,
        }

    undo = None if forward_only else (lambda: _discard_gradients(model_id, seq_id))
    return _ordered(
        model_id, seq_id, FWD_BWD, request, tokens, after=after, undo=undo, limit="TINKERBELL_TRAIN_TIME_LIMIT_S"
    )


@app.task(name="tinkerbell.optim_step", throws=(UserError,))
def optim_step(model_id: str, seq_id: int | None, adam_params: dict[str, Any]) -> dict[str, Any]:
    def before() -> None:
        lost = runtime.lost_gradients.pop(model_id, None)
        if lost is not None:  # stepping on what is left would apply only part of the batch: say so instead
            runtime.training.discard_gradients(model_id)
            _gradients_applied(model_id)
            reason = runtime.lost_reason.pop(model_id, LOST_WITH_WORKER)
            raise UserError(
                f"optim_step: the gradients of forward_backward calls from seq_id {lost} on {reason}; those and any "
                f"accumulated since are discarded: run the forward_backward calls again, then optim_step"
            )
        autosaver.wait(model_id)

    def after(metrics: dict[str, float]) -> dict[str, Any]:
        _gradients_applied(model_id)
        # The step is written in the background while the engine goes on; its result is published only once the
        # write is done (_ordered waits), so a step the client saw succeed survives a crash (bench/autosave.py).
        autosaver.start(model_id, seq_id)
        return {"metrics": metrics}

    return _ordered(
        model_id,
        seq_id,
        OPTIM,
        AdamSpec(**adam_params),
        before=before,
        after=after,
        undo=lambda: _back_to_autosave(model_id),
        limit="TINKERBELL_OPTIM_TIME_LIMIT_S",
    )


def _gradients_applied(model_id: str) -> None:
    """No gradients pending any more (applied, or discarded): clear the registry's mark, which gradients_since
    mirrors."""
    if runtime.gradients_since.pop(model_id, None) is not None:
        runtime.after_result(model_id, gradients_since=None)


@app.task(name="tinkerbell.save_state", throws=(UserError,))
def save_state(
    model_id: str,
    seq_id: int | None,
    name: str,
    kind: str = "weights",
    ttl_seconds: int | None = None,
    sampler_id: str | None = None,
) -> dict[str, Any]:
    """Save weights (kind=weights: with optimizer; sampler_weights/external_weights: weights only) and record the
    checkpoint."""
    target = checkpoint_dir(model_id, kind, name)

    def save() -> int:  # engine thread: only the write of the adapter's tensors needs the device owner
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
        size = runtime.training.save_state(model_id, str(tmp), kind == "weights")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return size

    def record(size: int) -> dict[str, Any]:
        model = runtime.registry.model_any(model_id) or {}
        path = f"tinker://{model_id}/{kind}/{name}"
        now = time.time()
        checkpoint = {
            "checkpoint_id": f"{kind}/{name}",
            "checkpoint_type": {
                "weights": "training",
                "sampler_weights": "sampler",
                "external_weights": "external",
            }[kind],
            "time": now,
            "tinker_path": path,
            "dir": str(target),
            "size_bytes": size,
            "public": False,
            "expires_at": now + ttl_seconds if ttl_seconds else None,
            "owner": model.get("owner"),
            "base_model": model.get("base_model"),
            "lora": model.get("lora"),
            "ephemeral": sampler_id is not None,
        }
        try:  # sampler snapshots are counted, not refused: TINKERBELL_EPHEMERAL_KEEP bounds them
            runtime.registry.add_checkpoint(model_id, checkpoint, limited=sampler_id is None)
        except QuotaExceeded as exc:  # only the written size showed it: the files go, the future fails
            shutil.rmtree(target, ignore_errors=True)
            runtime.registry.delete_checkpoint(model_id, checkpoint["checkpoint_id"])  # one it replaced, if any
            raise UserError(str(exc)) from None
        update = {"last_checkpoint" if kind == "weights" else "last_sampler_checkpoint": path}
        runtime.registry.update_model(model_id, **update)
        if sampler_id is not None:
            runtime.registry.create_sampler(
                sampler_id, model.get("owner"), model.get("session_id"), model.get("base_model"), path, str(target)
            )
            _prune_ephemeral(model_id)
        return {"path": path, "size_bytes": size, "sampling_session_id": sampler_id}

    def undo() -> str:
        shutil.rmtree(target, ignore_errors=True)
        return "no checkpoint is recorded and its files are deleted"

    save.__name__ = "save_state"
    return _ordered(model_id, seq_id, CALL, save, after=record, undo=undo)


def _prune_ephemeral(model_id: str) -> None:
    """An RL loop makes a sampler snapshot every step; keep the newest few so the disk does not fill up."""
    ephemeral = [c for c in runtime.registry.checkpoints(model_id) if c.get("ephemeral")]  # oldest first
    for checkpoint in ephemeral[: max(0, len(ephemeral) - runtime.settings.ephemeral_keep)]:
        runtime.registry.delete_checkpoint(model_id, checkpoint["checkpoint_id"])
        shutil.rmtree(checkpoint["dir"], ignore_errors=True)


@app.task(name="tinkerbell.load_state", throws=(UserError,))
def load_state(model_id: str, seq_id: int | None, directory: str, with_optimizer: bool, path: str) -> dict[str, Any]:
    def load() -> dict[str, Any]:
        if not Path(directory).exists():
            raise UserError(f"path: checkpoint '{path}' has no files (was it deleted?)")
        autosaver.wait(model_id)
        runtime.training.load_state(model_id, directory, with_optimizer)
        return {"path": path, "model_id": model_id}

    def loaded(result: dict[str, Any]) -> dict[str, Any]:  # kept: the new state is autosaved
        autosaver.start(model_id, seq_id)
        return result

    load.__name__ = "load_state"
    return _ordered(model_id, seq_id, CALL, load, after=loaded, undo=lambda: _back_to_autosave(model_id))
