"""Gunicorn settings for the production API: `gunicorn -c api/gunicorn_conf.py 'api:create_app()'`.

Bind address comes from core.settings (TINKERBELL_HOST / TINKERBELL_PORT); threads serve the long-polls.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Gunicorn execs this file before it puts its working directory on sys.path; core/ must import from anywhere.
_repo_root = str(Path(__file__).resolve().parent.parent)
if _repo_root not in sys.path:
    sys.path.insert(0, _repo_root)

from api.accesslog import ACCESS_LOG_FORMAT, AccessLogger
from core.settings import Settings

_settings = Settings.from_env()

bind = f"{_settings.host}:{_settings.port}"
worker_class = "api.gthread.LingeringThreadWorker"  # gthread, answering back-to-back requests on one thread
workers = 2
# Every retrieve_future long-poll holds a thread for up to TINKERBELL_POLL_TIMEOUT_S; 64 per process
# lets many clients poll at once without queueing behind each other.
threads = 64
timeout = 60  # gthread: worker heartbeat limit, longer than any single long-poll
graceful_timeout = 30
keepalive = 5
loglevel = _settings.log_level.lower()
accesslog = "-"  # stdout
errorlog = "-"  # stderr
access_log_format = ACCESS_LOG_FORMAT
logger_class = AccessLogger  # writes that format without building gunicorn's every-atom dict for each request
proc_name = "tinkerbell-api"
# gunicorn >= 25 opens a control socket at one per-user path; several APIs on one machine (the local stack,
# the tests) would take it from each other, and nothing here uses gunicornc.
control_socket_disable = True
