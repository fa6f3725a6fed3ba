"""gunicorn's gthread worker, keeping a connection's thread for the client's next request for a moment.

gthread hands every kept-alive connection back to its main thread's poller after each response; the next
request then wakes the main thread, which passes the connection to a pool thread again: two thread switches
and a pipe write before the request is read. Clients of this API send their requests back to back (a submit,
then its retrieve_future; the SDK pipelines several), so the thread that answered waits up to LINGER_S for
the next request and serves it itself. Past that, or when the worker is stopping, the connection goes back
to the poller exactly as in gthread.
"""

from __future__ import annotations

import selectors
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

LINGER_S = 0.002


class LingeringThreadWorker(ThreadWorker):
    def handle(self, conn: Any) -> Any:
        keepalive = super().handle(conn)
        while keepalive is True and self.alive and not getattr(conn, "is_http2", False):
            if not conn.parser.unreader.buf.getvalue():  # nothing read ahead: wait briefly for the socket
                with selectors.DefaultSelector() as selector:
                    selector.register(conn.sock, selectors.EVENT_READ)
                    if not selector.select(LINGER_S):
                        break
            keepalive = super().handle(conn)
        return keepalive
