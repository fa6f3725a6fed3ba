"""Futures: a long-poll on a Celery task's result in the Redis backend, woken by the backend's own publish.

`wait_result` holds a pending poll up to the timeout, so clients that re-poll at once (the Tinker SDK does)
make about one request per future instead of thousands. Each API thread keeps one subscriber connection
for all its polls; the published result is the stored one, so a wake-up needs no second read.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

import redis
from celery import states

from core.errors import UserError

PENDING = object()
RECHECK_S = 1.0  # a pending poll also re-reads the result this often (belt and braces for a lost message)

_local = threading.local()


def _subscribers() -> dict[str, Any]:
    """This thread's pubsub connections, one per result backend URL (a forked process makes its own)."""
    if getattr(_local, "pid", None) != os.getpid():
        _local.pubsubs, _local.pid = {}, os.getpid()
    return _local.pubsubs


def _subscriber(backend: Any) -> Any:
    """This thread's pubsub connection to the result backend."""
    pubsubs = _subscribers()
    if backend.url not in pubsubs:
        pubsubs[backend.url] = backend.client.pubsub()
    return pubsubs[backend.url]


def _drop_subscriber(backend: Any) -> None:
    pubsub = _subscribers().pop(backend.url, None)
    if pubsub is not None:
        with contextlib.suppress(Exception):  # it is being thrown away because it failed
            pubsub.close()


def _subscribe(pubsub: Any, channel: bytes, timeout_s: float) -> None:
    """SUBSCRIBE and wait for the server's confirmation, so a result published after this is not missed."""
    pubsub.subscribe(channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
        if message and message["type"] == "subscribe" and message["channel"] == channel:
            return


def wait_result(backend: Any, request_id: str, timeout_s: float) -> Any:
    """Block until the task finishes or timeout_s passes. Returns (state, result) or PENDING.

    backend: Celery's Redis result backend (tasks.celery_app.result_backend). A subscriber connection that Redis
    closed (it restarted since this thread's last poll) is replaced once; a second failure is Redis still away."""
    try:
        return _wait_result(backend, request_id, timeout_s)
    except (redis.ConnectionError, redis.TimeoutError):
        return _wait_result(backend, request_id, timeout_s)


def _wait_result(backend: Any, request_id: str, timeout_s: float) -> Any:
    if timeout_s <= 0:
        meta = backend.get_task_meta(request_id)
        return (meta["status"], meta["result"]) if meta["status"] in states.READY_STATES else PENDING
    channel = backend.get_key_for_task(request_id)
    deadline = time.monotonic() + timeout_s
    pubsub = _subscriber(backend)
    try:
        _subscribe(pubsub, channel, min(timeout_s, 5.0))
        meta = backend.get_task_meta(request_id)  # after subscribing: a result stored since is seen here or published
        recheck = time.monotonic() + RECHECK_S
        while meta["status"] not in states.READY_STATES:
            now = time.monotonic()
            if now >= deadline:
                return PENDING
            if now >= recheck:
                meta, recheck = backend.get_task_meta(request_id), now + RECHECK_S
                continue
            message = pubsub.get_message(ignore_subscribe_messages=True, timeout=min(deadline, recheck) - now)
            if message and message["type"] == "message" and message["channel"] == channel:
                meta = backend.decode_result(message["data"])  # the backend publishes what it stores
        return meta["status"], meta["result"]
    except Exception:
        _drop_subscriber(backend)
        raise
    finally:
        if _subscribers().get(backend.url) is pubsub:
            pubsub.unsubscribe(channel)  # no wait: its confirmation and any late message are skipped next time


def error_body(result: Any) -> dict[str, str]:
    """A failed task as the Tinker error shape: user errors say what to fix; others are server errors."""
    if isinstance(result, UserError):
        return {"error": str(result), "category": "user"}
    name = type(result).__name__
    return {"error": f"{name}: {result}", "category": "server"}
