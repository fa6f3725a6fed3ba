"""What one worker process holds: its name, the Celery consumer (to add/cancel queues), the registry and backends.

Filled in by `tasks.worker` when the worker starts; tasks read it through the functions below.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import task_postrun

from core.registry import Registry
from core.settings import Settings
from tasks.celery_app import adapter_queue, sample_queue

log = logging.getLogger("tinkerbell.worker")


class Runtime:
    def __init__(self) -> None:
        self.settings = Settings.from_env()
        self.name = self.settings.worker_name or "cpu0"
        self.registry = Registry(self.settings)
        self.consumer: Any = None
        self.lock = threading.Lock()
        self._training: Any = None
        self._sampling: Any = None
        self.sample_queues: set[str] = set()
        self.current_task: dict[str, Any] | None = None  # set by the task_prerun/postrun signals
        self.applied_seq: dict[str, int] = {}  # model_id -> last seq_id applied here (mirrors the registry)
        self.gradients_since: dict[str, int] = {}  # model_id -> seq_id of the first forward_backward since optim_step (mirrors the registry)
        self.lost_gradients: dict[str, int] = {}  # model_id -> the same, for gradients a previous run held when it died
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

    def consume(self, queue: str) -> None:
        """Start consuming a queue now (same thread as the solo pool, so no race with the running task)."""
        if self.consumer is not None and not self.consumer.task_consumer.consuming_from(queue):
            self.consumer.add_task_queue(queue)
            log.info("consuming %s", queue)

    def stop_consuming(self, queue: str) -> None:
        if self.consumer is not None:
            self.consumer.cancel_task_queue(queue)
            log.info("stopped consuming %s", queue)

    def own_adapter(self, model_id: str) -> None:
        self.consume(adapter_queue(model_id))

    def release_adapter(self, model_id: str) -> None:
        self.stop_consuming(adapter_queue(model_id))

    def serve_base_model(self, base_model: str) -> None:
        self.sample_queues.add(base_model)
        self.consume(sample_queue(base_model))

    def after_result(self, model_id: str | None = None, stats: dict[str, float] | None = None, **fields: Any) -> None:
        """Registry bookkeeping a task leaves for after its result is stored (flush_after_result), off the
        request's critical path. Safe for applied_seq: a redelivered message whose result is stored never runs."""
        if model_id is not None:
            self._model_updates.setdefault(model_id, {}).update(fields)
        for name, amount in (stats or {}).items():
            self._stats[name] = self._stats.get(name, 0.0) + amount

    def flush_after_result(self) -> None:
        models, stats = self._model_updates, self._stats
        if not models and not stats:
            return
        self._model_updates, self._stats = {}, {}
        try:
            self.registry.apply_updates(models, stats)
        except Exception:
            log.exception("could not record %s / %s in the registry", models, stats)

    def status(self) -> dict[str, Any]:
        info: dict[str, Any] = {"device": self.settings.device, "base_models": sorted(set(self.settings.worker_base_models) | self.sample_queues), "current_task": self.current_task}
        if self._training is not None:
            backend_status = self._training.status()
            info["memory_bytes"] = backend_status.get("memory_bytes", 0)
            info["loaded_models"] = backend_status.get("base_models", [])
        return info


runtime = Runtime()


@task_postrun.connect(weak=False)
def _after_result(**_: Any) -> None:
    """Runs after any task's result is stored (and visible to the client): the deferred registry writes."""
    runtime.flush_after_result()
