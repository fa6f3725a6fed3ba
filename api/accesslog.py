"""The API's access log line, written without gunicorn's general-purpose formatting.

gunicorn's `Logger.access` builds a dict of every atom it knows (each request header, response header and
environ entry) for each request, which costs more than the request's own routing and validation. This logger
writes the one line the API's `access_log_format` names; any other format goes through gunicorn's own code.
"""

from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger

ACCESS_LOG_FORMAT = 'api.access %(h)s "%(r)s" %(s)s %(b)s %(M)sms'


class AccessLogger(Logger):
    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if not self.access_log_enabled:
            return
        if self.cfg.access_log_format != ACCESS_LOG_FORMAT:
            super().access(resp, req, environ, request_time)
            return
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        sent = getattr(resp, "sent", None)
        milliseconds = request_time.seconds * 1000 + request_time.microseconds // 1000
        try:
            self.access_log.info('api.access %s "%s %s %s" %s %s %sms', environ.get("REMOTE_ADDR", "-"), environ["REQUEST_METHOD"], environ["RAW_URI"], environ["SERVER_PROTOCOL"], status, "-" if sent is None else sent, milliseconds)
        except Exception:  # noqa: BLE001 - a log line never fails a request (gunicorn's own access() does the same)
            self.exception("could not write the access log")
