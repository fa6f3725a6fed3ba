"""Putting back, when a worker starts, the requests it had taken and not finished when it last stopped."""

from __future__ import annotations

import json
from typing import Any

from kombu.utils.encoding import bytes_to_str


def restore_own_unacked(connection: Any, queues: set[str]) -> list[str]:
    """Put back on their queues the messages a previous run of this worker took from `queues` and never acked.

    kombu restores an unacked message only once the visibility timeout (an hour here) has passed, so a request
    in flight when a worker was killed would wait that long. Only the owner consumes a worker's or an adapter's
    queue, so when the worker starts again, before it consumes anything, every unacked message of those queues is
    its own from before. kombu's restore puts each back at the end BRPOP takes next, marked redelivered (Celery
    then skips it if its result was stored). Returns the task ids restored.
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
