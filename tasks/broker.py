"""The worker's side of the broker: putting back, when a worker starts, the requests it had taken and not finished
when it last stopped, and a consumer that survives a Redis restart."""

from __future__ import annotations

import json
import logging
from typing import Any

from celery.worker.consumer import Consumer as _CeleryConsumer
from kombu.utils.encoding import bytes_to_str

log = logging.getLogger("tinkerbell.worker")


def restore_own_unacked(connection: Any, queues: set[str]) -> list[str]:
    """Put back on their queues the messages a previous run of this worker took from `queues` and never acked.

    kombu restores an unacked message only once the visibility timeout (an hour here) has passed, so a request
    in flight when a worker was killed would wait that long. Only the owner consumes a worker's or an adapter's
    queue, so when the worker starts again, before it consumes anything, every unacked message of those queues is
    its own from before. kombu's restore puts each back at the end BRPOP takes next, marked redelivered (Celery
    then skips it if its result was stored). The same holds for the next holder of a dead worker's adapter, which
    calls this for that adapter's queue before it consumes it. Returns the task ids restored.
    """
    channel = connection.default_channel
    restored = []
    with channel.conn_or_acquire() as client:
        for tag, record in client.hscan_iter(channel.unacked_key):
            try:
                payload, _exchange, routing_key = json.loads(record)
            except (ValueError, TypeError):
                continue
            if routing_key in queues:
                channel.qos.restore_by_tag(tag, client)
                restored.append((payload.get("headers") or {}).get("id") or bytes_to_str(tag))
    return restored


class Consumer(_CeleryConsumer):
    """Celery's worker consumer (setting `worker_consumer`), surviving a broker connection lost while requests run.

    Celery 5.7.0 reacts to a lost connection with `collect()` (which drops the transport's connection info) and then
    `close()`, whose channel close asks kombu to restore the unacked messages, and kombu's Redis transport then fails
    with AttributeError ('NoneType' object has no attribute 'hostname'): not a connection error, so the worker
    stops ("Unrecoverable error") with every request in flight; seen on every Redis restart under load. Celery 5.6.3
    only collected. Here that one AttributeError is taken as the close having nothing more to do (what follows in
    Celery's method only cancels tasks when worker_cancel_long_running_tasks_on_connection_loss, off here, and
    lowers the prefetch count), and the consumer reconnects. The messages stay unacked in Redis; the requests keep
    running on the pool threads and ack when done. tests/test_redis_restart.py fails if this path changes.
    """

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        lost = self.connection
        transport = lost.transport if lost is not None else None
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError:
            if self.connection is not None:  # not the failure described above: Celery's code under us changed
                raise
            log.warning("broker connection lost; the closed connection could not restore its unacked messages")
        finally:
            if transport is not None and transport.client is None:
                # Requests taken on the lost connection still run on the pool threads; their acks go through that
                # connection's channel, which makes a fresh client from this (else the same AttributeError, in
                # the event loop, stops the worker).
                transport.client = lost
