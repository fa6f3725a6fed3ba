"""What one worker process holds: its name, the Celery consumer (to add/cancel queues), the registry, the backends
and the engine that runs every request on them (tasks/engine.py).

`tasks.worker.main()` configures it from the worker's Settings before the worker starts; tasks read it then.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from celery.signals import task_postrun, task_revoked

from core.errors import UserError
from core.registry import Registry
from core.settings import Settings
from tasks.celery_app import adapter_queue, sample_queue
from tasks.engine import NOT_RUN, Engine

log = logging.getLogger("tinkerbell.worker")


class Runtime:
    def configure(self, settings: Settings, celery: Celery) -> None:
        """Everything the worker holds, made from its one Settings; celery: the app it runs (tasks.worker.main)."""
        self.settings = settings
        self.celery = celery
        self.name = self.settings.worker_name or "cpu0"
        self.registry = Registry(self.settings)
        self.consumer: Any = None
        self._training: Any = None
        self._sampling: Any = None
        self._pending_lock = threading.Lock()  # after_result is called from the engine and pool threads
        self.sample_queues: set[str] = set()
        self.engine = Engine(
            lambda: self.training,
            lambda: self.sampling,
            self._registry_applied_seq,
            self._missing_seq_ids,
            token_budget=self.settings.engine_token_budget,
            gap_timeout_s=self.settings.seq_gap_timeout_s,
            gather_s=self.settings.engine_gather_s,
        )
        self.applied_seq: dict[str, int] = {}  # model_id -> last seq_id applied here (mirrors the registry)
        self.gradients_since: dict[
            str, int
        ] = {}  # model_id -> seq_id of the first forward_backward since optim_step (mirrors the registry)
        self.lost_gradients: dict[str, int] = {}  # model_id -> the same, for gradients a previous run held when it died
        self.lost_reason: dict[str, str] = {}  # model_id -> why, when not that (a request past its time limit)
        self.epochs: dict[str, int] = {}  # model_id -> the placement epoch this worker holds it with (core.registry)
        self._model_updates: dict[str, dict[str, Any]] = {}
        self._stats: dict[str, float] = {}

    @property
    def training(self) -> Any:
        if self._training is None:
            from backends.loader import get_training_backend

            self._training = get_training_backend(self.settings)
        return self._training

    @property
    def sampling(self) -> Any:
        if self._sampling is None:
            from backends.loader import get_sampling_backend

            self._sampling = get_sampling_backend(self.settings)
        return self._sampling

    def _registry_applied_seq(self, model_id: str) -> int:
        if model_id not in self.applied_seq:
            self.applied_seq[model_id] = int((self.registry.model_any(model_id) or {}).get("applied_seq", 0))
        return self.applied_seq[model_id]

    def _missing_seq_ids(self, model_id: str, after: int, before: int) -> list[int]:
        """seq_ids between after and before admitted for a request that has no stored result: still to come."""
        admitted = self.registry.admitted_between(model_id, after, before)
        real = {seq: rid for seq, rid in admitted.items() if rid and not rid.startswith(NOT_RUN)}
        if not real:
            return []
        # A stored result means it finished (a redelivered copy skipped by Celery never reaches the engine).
        backend = self.celery.backend
        with backend.client.pipeline(transaction=False) as pipe:
            for rid in real.values():
                pipe.exists(backend.get_key_for_task(rid))
            stored = pipe.execute()
        return [seq for seq, done in zip(real, stored) if not done]

    def _in_consumer(self, method: str, queue: str) -> None:
        """Add or cancel a queue from the consumer's own thread (pool threads and the engine must not touch it)."""
        if self.consumer is None:
            return
        consumer = self.consumer

        def apply() -> None:
            if method == "add" and not consumer.task_consumer.consuming_from(queue):
                consumer.add_task_queue(queue)
                log.info("consuming %s", queue)
            elif method == "cancel":
                consumer.cancel_task_queue(queue)
                log.info("stopped consuming %s", queue)

        consumer.call_soon(apply)

    def consume(self, queue: str) -> None:
        self._in_consumer("add", queue)

    def stop_consuming(self, queue: str) -> None:
        self._in_consumer("cancel", queue)

    def own_adapter(self, model_id: str) -> None:
        self.consume(adapter_queue(model_id))

    def release_adapter(self, model_id: str) -> None:
        self.stop_consuming(adapter_queue(model_id))

    def serve_base_model(self, base_model: str) -> None:
        """Consume sample.<base_model>: sampling workers only (a train-only worker still trains on it)."""
        if "sample" in self.settings.roles:
            self.sample_queues.add(base_model)
            self.consume(sample_queue(base_model))

    def after_result(self, model_id: str | None = None, stats: dict[str, float] | None = None, **fields: Any) -> None:
        """Registry bookkeeping a task leaves for after its result is stored (flush_after_result), off the
        request's critical path. Safe for applied_seq: a redelivered message whose result is stored never runs."""
        with self._pending_lock:
            if model_id is not None:
                self._model_updates.setdefault(model_id, {}).update(fields)
            for name, amount in (stats or {}).items():
                self._stats[name] = self._stats.get(name, 0.0) + amount

    def flush_after_result(self) -> None:
        with self._pending_lock:
            models, stats = self._model_updates, self._stats
            if not models and not stats:
                return
            self._model_updates, self._stats = {}, {}
        try:
            self.registry.apply_updates(models, stats, worker=self.name, epochs=dict(self.epochs))
        except Exception:
            log.exception("could not record %s / %s in the registry", models, stats)

    def hold(self, model_id: str, epoch: int) -> None:
        """This worker holds the adapter now, with this placement epoch; what it knew of an earlier hold is dropped
        (applied_seq and pending gradients are read from the registry again)."""
        self.forget_adapter(model_id)
        self.epochs[model_id] = epoch

    def forget_adapter(self, model_id: str) -> None:
        for known in (self.epochs, self.applied_seq, self.gradients_since, self.lost_gradients, self.lost_reason):
            known.pop(model_id, None)

    def holds(self, model_id: str) -> bool:
        """The registry still names this worker, with the epoch it was given, as the adapter's holder (a model
        being created here, before its epoch is known, counts as held)."""
        placement = self.registry.placement(model_id)
        if placement is None or placement.deleted:
            return True  # unknown or removed: the request fails on its own terms
        if placement.worker != self.name:
            return False
        mine = self.epochs.get(model_id)
        return mine == placement.epoch or (mine is None and placement.status == "creating")

    def status(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "device": self.settings.device,
            "role": ",".join(sorted(self.settings.roles)),
            "training_backend": self.settings.training_backend_name,
            "sampling_backend": self.settings.sampling_backend_name,
            "base_models": sorted(set(self.settings.worker_base_models) | self.sample_queues),
            "engine": self.engine.status(),
            "current_task": self.engine.busy,  # what the status page shows as "running"
        }
        if self._training is not None:
            backend_status = self._training.status()
            info["memory_bytes"] = backend_status.get("memory_bytes", 0)
            info["loaded_models"] = backend_status.get("base_models", [])
            info["loaded_adapters"] = len(backend_status.get("adapters", []))
        else:
            backend_status = self._sampling.status() if self._sampling is not None else {}
        if "model_bytes" in backend_status:  # the HF backends: one model cache for training and sampling
            info["loaded_models"] = sorted(backend_status["model_bytes"])
            info["model_bytes"] = backend_status["model_bytes"]
            info["model_memory_limit_bytes"] = self.settings.model_memory_bytes
        return info

    def check_served(self, base_model: str) -> None:
        """A request for a base model this deployment does not serve (the API refuses it first, unless its settings
        differ from this worker's) fails as the user's error, naming the list."""
        served = self.settings.worker_base_models
        if base_model not in served:
            raise UserError(
                f"base_model: {base_model!r} is not served by worker {self.name}; served: {', '.join(served)} "
                "(TINKERBELL_BASE_MODELS)"
            )


runtime = Runtime()  # configured by tasks.worker.main()


@task_postrun.connect(weak=False)
def _after_result(task_id: str | None = None, **_: Any) -> None:
    """Runs after any task's result is stored (and visible to the client): the deferred registry writes, and the
    request leaves its owner's queued count (TINKERBELL_MAX_QUEUED_REQUESTS_PER_KEY)."""
    runtime.flush_after_result()
    _finished(task_id)


@task_revoked.connect(weak=False)
def _after_revoke(request: Any = None, **_: Any) -> None:
    """A revoked request never runs: it leaves its owner's queued count too."""
    _finished(getattr(request, "id", None))


def _finished(task_id: str | None) -> None:
    if task_id:
        try:
            runtime.registry.finish_request(task_id)
        except Exception:  # the API's prune_queued heals the count when the limit is reached
            log.exception("could not count request %s out of its owner's queue", task_id)
