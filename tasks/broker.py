"""kombu's Redis transport with two costs taken off a task's start (set as Celery's `broker_transport`).

1. Before a solo worker runs a message it records it as unacked (ZADD + HSET in one transaction, so a crash
   mid-task leaves it to be restored). kombu waits for Redis's reply before running the task. Here the commands
   are written to Redis before the task starts and their replies read before the next unacked bookkeeping (ack,
   reject, restore) or the next append, so the ack's commands reach Redis only after the record is in, and a
   failed write is raised there (kombu would have raised it before the task).
2. kombu builds a new redis-py client object for every append and ack (about as costly as the round trip);
   here one per channel serves them all (a client takes a pooled connection per command, so it is shared
   safely).

Everything else, and what lies in Redis, is kombu's own: a worker on this transport and one on kombu's plain
`redis` transport read and restore each other's messages.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from time import time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps

log = logging.getLogger("tinkerbell.broker")


class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: tuple[Any, Any, int] | None = None  # (pool, connection, replies owed) of the last append

    def append(self, message: Any, delivery_tag: str) -> None:
        self.settle()
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        commands = [("MULTI",), ("ZADD", self.unacked_index_key, time(), delivery_tag), ("HSET", self.unacked_key, delivery_tag, record), ("EXEC",)]
        pool = self.channel.pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command(connection.pack_commands(commands))
        except BaseException:
            connection.disconnect()
            pool.release(connection)
            raise
        self._pending = (pool, connection, len(commands))
        virtual_append = super(kombu_redis.QoS, self).append  # the in-memory bookkeeping of virtual.QoS
        virtual_append(message, delivery_tag)

    def settle(self) -> None:
        """Read the replies of the last append (it is in Redis once this returns); a failure is logged and raised."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pool, connection, owed = pending
        try:
            replies = [connection.read_response() for _ in range(owed)]
        except BaseException:
            connection.disconnect()
            raise
        finally:
            pool.release(connection)
        executed = replies[-1]  # EXEC's reply: one result per command, or None if the transaction was aborted
        if not isinstance(executed, list) or any(isinstance(reply, Exception) for reply in executed):
            log.error("recording a message as unacked failed: %r", replies)
            raise RuntimeError(f"recording a message as unacked failed: {replies!r}")

    def ack(self, delivery_tag: str) -> None:
        self.settle()
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        self.settle()
        super().reject(delivery_tag, requeue)

    def restore_unacked(self, client: Any = None) -> None:
        with contextlib.suppress(Exception):  # shutting down after a broken connection: restore what can be
            self.settle()
        super().restore_unacked(client)


class Channel(kombu_redis.Channel):
    QoS = QoS

    @contextlib.contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        shared = self.__dict__.get("_shared_client")
        if shared is None:
            shared = self._shared_client = self._create_client()
        yield shared


class Transport(kombu_redis.Transport):
    Channel = Channel


def restore_own_unacked(connection: Any, queues: set[str]) -> list[str]:
    """Put back on their queues the messages a previous run of this worker took from `queues` and never acked.

    kombu restores an unacked message only once the visibility timeout (an hour here) has passed, so a request
    in flight when a worker was killed would wait that long. Only the owner consumes a worker's or an adapter's
    queue, so when the worker starts again, before it consumes anything, every unacked message of those queues is
    its own from before. kombu's restore puts each back at the end BRPOP takes next, marked redelivered (Celery
    then skips it if its result was stored). Returns the task ids restored.
    """
    channel = connection.default_channel
    client = channel._create_client()
    restored = []
    for tag, record in client.hscan_iter(channel.unacked_key):
        try:
            payload, _exchange, routing_key = json.loads(record)
        except (ValueError, TypeError):
            continue
        if routing_key in queues:
            channel.qos.restore_by_tag(tag, client)
            restored.append((payload.get("headers") or {}).get("id") or bytes_to_str(tag))
    return restored
