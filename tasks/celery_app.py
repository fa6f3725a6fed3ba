"""The Celery application shared by api/ (publishes) and workers (consume). No torch here.

Queues: `worker.<name>` (one per worker: create/restore adapters), `adapter.<model_id>` (one per adapter,
consumed by its owner only, FIFO = seq_id order), `sample.<base_model>` (every worker serving that model).
"""

from __future__ import annotations

from celery import Celery

from core.settings import Settings

settings = Settings.from_env()

app = Celery("tinkerbell", broker=settings.broker_url, backend=settings.backend_url, include=["tasks.training", "tasks.sampling"])
app.conf.update(
    task_serializer="msgpack",  # DESIGN rule 4: plain data, bytes for arrays, never pickle
    result_serializer="msgpack",
    accept_content=["msgpack", "json"],
    result_accept_content=["msgpack", "json"],
    task_acks_late=True,  # a crash mid-task leaves the message on the broker, not lost
    task_reject_on_worker_lost=True,
    worker_deduplicate_successful_tasks=True,  # a redelivered message whose result is stored is not run again
    worker_prefetch_multiplier=1,  # one message at a time keeps each adapter queue's FIFO order
    task_create_missing_queues=True,
    task_default_queue="tinkerbell.default",
    result_expires=7 * 86400,
    result_extended=True,  # Flower and inspect show task names/args from the result too
    worker_send_task_events=True,
    task_send_sent_event=True,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": 3600},
    worker_hijack_root_logger=False,
)


def adapter_queue(model_id: str) -> str:
    return f"adapter.{model_id}"


def worker_queue(name: str) -> str:
    return f"worker.{name}"


def sample_queue(base_model: str) -> str:
    return f"sample.{base_model}"
