"""Gunicorn settings for the production API: `gunicorn -c api/gunicorn_conf.py 'api:create_app()'`.

Bind address comes from core.settings (TINKERBELL_HOST / TINKERBELL_PORT); gunicorn's stock gthread worker, whose
threads serve the long-polls, and its stock access log. The worker processes write their request metrics to
prometheus_client's multiprocess directory, which /metrics sums over (api/ops.py).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

# Gunicorn execs this file before it puts its working directory on sys.path; core/ must import from anywhere.
_repo_root = str(Path(__file__).resolve().parent.parent)
if _repo_root not in sys.path:
    sys.path.insert(0, _repo_root)

from core.settings import Settings

_settings = Settings.from_env()

bind = f"{_settings.host}:{_settings.port}"
worker_class = "gthread"
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
access_log_format = 'api.access %(h)s "%(r)s" %(s)s %(b)s %(M)sms'  # no headers: they carry the API keys
proc_name = "tinkerbell-api"
# gunicorn >= 25 opens a control socket at one per-user path; several APIs on one machine (the local stack,
# the tests) would take it from each other, and nothing here uses gunicornc.
control_socket_disable = True

_made_metrics_dir: list[str] = []  # the directory on_starting made, removed on exit


def on_starting(server: Any) -> None:
    """Before the workers start (and import prometheus_client, which reads it then): PROMETHEUS_MULTIPROC_DIR,
    emptied of a previous run's files (their counts would be added to this run's)."""
    directory = _settings.metrics_dir
    if not directory:
        directory = tempfile.mkdtemp(prefix="tinkerbell-metrics-")
        _made_metrics_dir.append(directory)
    Path(directory).mkdir(parents=True, exist_ok=True)
    for stale in Path(directory).glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory


def child_exit(server: Any, worker: Any) -> None:
    """prometheus_client's multiprocess mode: a dead worker's live gauges go; its counts stay in the totals."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    for directory in _made_metrics_dir:
        shutil.rmtree(directory, ignore_errors=True)
