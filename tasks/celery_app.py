"""The Celery application shared by api/ (publishes) and workers (consume). No torch here.

Queues: `worker.<name>` (one per worker: create/restore adapters), `adapter.<model_id>` (one per adapter,
consumed by its owner only, FIFO = seq_id order), `sample.<base_model>` (every worker serving that model).
"""

from __future__ import annotations

import base64
import json
import socket
import uuid
from typing import Any

from celery import Celery
from celery.backends.redis import RedisBackend
from kombu.serialization import dumps as serialize
from kombu.utils.encoding import bytes_to_str

from core.settings import Settings

settings = Settings.from_env()

# KEYS: 1 the task's result key. ARGV: 1 encoded meta (msgpack), 2 expiry seconds (0 = none).
# A stored success starts {"status": "SUCCESS", …}: msgpack map header, then fixstr "status", fixstr "SUCCESS"
# (Redis 7's cmsgpack cannot unpack the bin values results hold, so the head is matched as bytes).
_STORE_LUA = """
local current = redis.call('GET', KEYS[1])
if current and string.find(string.sub(current, 1, 24), '\\166status\\167SUCCESS', 1, true) then return 0 end
if tonumber(ARGV[2]) > 0 then redis.call('SETEX', KEYS[1], ARGV[2], ARGV[1]) else redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


class ResultBackend(RedisBackend):
    """Celery's Redis result backend, storing a result in one atomic round trip.

    Celery reads a task's stored state before writing its result, so that a lost duplicate never overwrites a
    success: a second round trip on every task. Here a Redis script makes that check and the write in one step
    (results are msgpack; the script recognises a stored success by its first bytes). The stored and
    published values are exactly Celery's.
    """

    def _get_result_meta(self, result: Any, state: str, traceback: Any, request: Any, format_date: bool = True, encode: bool = False) -> dict[str, Any]:
        """Celery's meta plus where the task ran (task name, worker, queue), but not its arguments: Celery's
        result_extended would store every request's token arrays again, for a week."""
        meta = super()._get_result_meta(result, state, traceback, request, format_date, encode)
        if request is not None:
            meta.update(name=getattr(request, "task", None), worker=getattr(request, "hostname", None), queue=(getattr(request, "delivery_info", None) or {}).get("routing_key"))
        return meta

    def _store_result(self, task_id: Any, result: Any, state: str, traceback: Any = None, request: Any = None, **kwargs: Any) -> Any:
        if self.serializer != "msgpack":
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        if not hasattr(self, "_store_script"):
            self._store_script = self.client.register_script(_STORE_LUA)
        self._store_script(keys=[self.get_key_for_task(task_id)], args=[self.encode(meta), int(self.expires or 0)])
        return result


app = Celery("tinkerbell", broker=settings.broker_url, backend=f"tasks.celery_app:ResultBackend+{settings.backend_url}", include=["tasks.training", "tasks.sampling"])
app.conf.update(
    task_serializer="msgpack",  # DESIGN rule 4: plain data, bytes for arrays, never pickle
    result_serializer="msgpack",
    accept_content=["msgpack", "json"],
    result_accept_content=["msgpack", "json"],
    task_acks_late=True,  # a crash mid-task leaves the message on the broker, not lost
    task_reject_on_worker_lost=True,
    worker_deduplicate_successful_tasks=True,  # a redelivered message whose result is stored is not run again
    # Messages reserved per pool thread; the worker's engine, not the broker, orders each adapter's requests by seq_id.
    worker_prefetch_multiplier=settings.worker_prefetch,
    task_create_missing_queues=True,
    task_default_queue="tinkerbell.default",
    result_expires=7 * 86400,
    worker_send_task_events=True,  # Flower follows tasks from the worker's received/started/succeeded events
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": 3600},
    # kombu's Redis transport, minus a round trip and a client object before each task (tasks/broker.py);
    # other schemes (rediss, sentinel, socket) keep kombu's own.
    broker_transport="tasks.broker:Transport" if settings.broker_url.startswith("redis://") else None,
    worker_hijack_root_logger=False,
)


def adapter_queue(model_id: str) -> str:
    return f"adapter.{model_id}"


def worker_queue(name: str) -> str:
    return f"worker.{name}"


def sample_queue(base_model: str) -> str:
    return f"sample.{base_model}"


ORIGIN = f"tinkerbell-api@{socket.gethostname()}"


def task_message(task: str, kwargs: dict[str, Any], task_id: str, queue: str, kwargsrepr: str) -> str:
    """The broker message `send_task` would push onto `queue`, as JSON.

    Celery builds the task (protocol 2 headers and msgpack body); the envelope is kombu's for Redis queues
    (base64 body, delivery info for the default exchange), so a worker cannot tell it from one send_task made.
    api/ pushes it inside the registry's admission script: ordering and publishing are one atomic step.
    """
    headers, properties, body, _ = app.amqp.as_task_v2(task_id, task, kwargs=kwargs, argsrepr="()", kwargsrepr=kwargsrepr, origin=ORIGIN, ignore_result=None)
    content_type, content_encoding, data = serialize(body, serializer=app.conf.task_serializer)
    envelope = {
        "body": base64.b64encode(data).decode(),
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": {**properties, "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    }
    return json.dumps(envelope, separators=(",", ":"))
