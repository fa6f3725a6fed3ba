"""The Celery application shared by api/ (publishes) and workers (consume), made from a Settings. No torch here.

Queues: `worker.<name>` (one per worker: create/restore adapters), `adapter.<model_id>` (one per adapter,
consumed by its owner only), `sample.<base_model>` (every worker serving that model).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.backends.redis import RedisBackend

from core.settings import Settings, redis_ssl_options

TASK_MODULES = ["tasks.training", "tasks.sampling", "tasks.placement"]


def config(settings: Settings) -> dict[str, Any]:
    """Celery's configuration for these settings (tasks.worker applies it to the module-level app it runs).

    A rediss:// URL's TLS options (its query) become broker_use_ssl / redis_backend_use_ssl: kombu reads them only
    from there, and would otherwise connect without checking the server's certificate."""
    tls = {
        name: options
        for name, url in (("broker_use_ssl", settings.broker_url), ("redis_backend_use_ssl", settings.backend_url))
        if (options := redis_ssl_options(url)) is not None
    }
    return {
        **tls,
        "broker_url": settings.broker_url,
        "result_backend": settings.backend_url,
        "task_serializer": "msgpack",  # DESIGN rule 4: plain data, bytes for arrays, never pickle
        "result_serializer": "msgpack",
        "accept_content": ["msgpack", "json"],
        "result_accept_content": ["msgpack", "json"],
        "task_acks_late": True,  # a crash mid-task leaves the message on the broker, not lost
        "task_reject_on_worker_lost": True,
        "worker_deduplicate_successful_tasks": True,  # a redelivered message whose result is stored is not run again
        # Messages reserved per pool thread; the worker's engine, not the broker, orders each adapter's requests.
        "worker_prefetch_multiplier": settings.worker_prefetch,
        "task_create_missing_queues": True,
        "task_default_queue": "tinkerbell.default",
        "result_expires": 7 * 86400,
        "worker_send_task_events": True,  # Flower follows tasks from the workers' received/started/succeeded events
        "task_send_sent_event": True,  # ... and from api/'s task-sent events
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # a worker waits for Redis to come back, however long
        # Redis restarted (README, Reliability): dead sockets are noticed within seconds, not at the next command.
        "broker_transport_options": {"visibility_timeout": 3600, "health_check_interval": 5, "socket_keepalive": True},
        "result_backend_transport_options": {"health_check_interval": 5, "socket_keepalive": True},
        # A result whose store meets Redis away is stored once it is back, never dropped: the result is stored
        # before the ack and before the registry's applied_seq write (task_postrun), so a result the client can
        # see is never lost, and a message is acked only after its result is stored.
        "result_backend_always_retry": True,
        "result_backend_max_sleep_between_retries_ms": 1000,
        "result_backend_max_retries": max(1, int(settings.redis_outage_s)),
        "worker_consumer": "tasks.broker:Consumer",
        # api/'s send_task waits out a Redis restart too (the outbox sweep is the fallback, after 10 s).
        "task_publish_retry_policy": {
            "max_retries": max(1, int(settings.redis_outage_s)),
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 1,
        },
        "worker_hijack_root_logger": False,
    }


def make_app(settings: Settings, results: bool = True) -> Celery:
    """A Celery app on the settings' broker and result backend, configured as workers and api/ expect.

    Stock parts only: kombu's Redis transport, and Celery's Redis result backend, which never overwrites a stored
    success and publishes what it stores (api/futures.py wakes on that publish).
    results=False: an app that only publishes (api/), without a result backend. With Celery's Redis backend,
    send_task subscribes to every task's result for an AsyncResult.get() that api/ never calls, and the unread
    subscribe/unsubscribe replies pile up on that connection (about 110 bytes a task; celery/celery#4983).
    api/ reads results through `result_backend` instead.
    """
    app = Celery("tinkerbell", include=TASK_MODULES, set_as_current=False)
    app.conf.update(config(settings))
    if not results:
        app.conf.result_backend = None
    return app


def result_backend(app: Celery, settings: Settings) -> RedisBackend:
    """Celery's Redis result backend for the settings, configured by `app` (serializers, expiry); one serves every
    thread (its redis-py client pools connections)."""
    return RedisBackend(app=app, url=settings.backend_url)


settings = Settings.from_env()  # the one read for the module-level app below
# The app `celery -A tasks …` finds and the task modules register with. api/ and tests make their own with make_app.
app = make_app(settings)
app.set_current()


def adapter_queue(model_id: str) -> str:
    return f"adapter.{model_id}"


def worker_queue(name: str) -> str:
    return f"worker.{name}"


def sample_queue(base_model: str) -> str:
    return f"sample.{base_model}"
