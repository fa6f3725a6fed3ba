"""Futures: a long-poll on a Celery task's result in the Redis backend, woken by the backend's own publish.

`wait_result` holds a pending poll up to the timeout, so clients that re-poll at once (the Tinker SDK does)
make about one request per future instead of thousands.
"""

from __future__ import annotations

import time
from typing import Any

from celery import states

from core.errors import UserError
from tasks.celery_app import app as celery_app

PENDING = object()


def wait_result(request_id: str, timeout_s: float) -> Any:
    """Block until the task finishes or timeout_s passes. Returns (state, result) or PENDING."""
    backend = celery_app.backend
    meta = backend.get_task_meta(request_id)
    if meta["status"] in states.READY_STATES:
        return meta["status"], meta["result"]
    if timeout_s <= 0:
        return PENDING
    channel = backend.get_key_for_task(request_id).decode()
    pubsub = backend.client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(channel)
        deadline = time.monotonic() + timeout_s
        while True:
            meta = backend.get_task_meta(request_id)  # re-check after subscribing: no lost wake-up
            if meta["status"] in states.READY_STATES:
                return meta["status"], meta["result"]
            left = deadline - time.monotonic()
            if left <= 0:
                return PENDING
            pubsub.get_message(timeout=min(left, 1.0))
    finally:
        pubsub.close()


def error_body(result: Any) -> dict[str, str]:
    """A failed task as the Tinker error shape: user errors say what to fix; others are server errors."""
    if isinstance(result, UserError):
        return {"error": str(result), "category": "user"}
    name = type(result).__name__
    return {"error": f"{name}: {result}", "category": "server"}
