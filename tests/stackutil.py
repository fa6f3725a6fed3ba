"""Start real parts for tests: a redis-server on a free port, Celery worker processes, the API over HTTP.

Everything runs as its own process, so several independent stacks (one per Redis db) can coexist.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from scripts.stack import find_redis_server

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = "tinkerbell/tiny-llama"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """password: the server requires it (requirepass, given on stdin), and url() carries it. tls: the server speaks
    only TLS, with a self-signed certificate made here (openssl), and url() is rediss:// checking it.
    appendfsync: None runs without the append-only file; "always"/"everysec"/"no" with it, as compose does."""

    def __init__(self, password: str | None = None, tls: bool = False, appendfsync: str | None = None) -> None:
        self.port = free_port()
        self.password = password
        self.dir = tempfile.mkdtemp(prefix="tb-redis-")
        self.appendfsync = appendfsync
        self.ca_file = self._make_certificate() if tls else None
        self.listen = ["--port", str(self.port)]
        if self.ca_file is not None:
            self.listen = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            for option, name in (("cert", "cert.pem"), ("key", "key.pem"), ("ca-cert", "cert.pem")):
                self.listen += [f"--tls-{option}-file", str(Path(self.dir) / name)]
        self.start()

    def start(self) -> None:
        aof = ["--appendonly", "yes", "--appendfsync", self.appendfsync] if self.appendfsync else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [
                find_redis_server(),
                "-",
                *self.listen,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *aof,
                "--dir",
                self.dir,
                "--databases",
                "64",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(f'requirepass "{self.password}"\n'.encode() if self.password else b"")
        self.proc.stdin.close()
        wait_for(lambda: _redis_ping(self.port, self.password, self.ca_file), 10, "redis-server")

    def restart(self, sig: int = signal.SIGTERM, down_s: float = 2.0) -> None:
        """Stop the server with `sig`, stay down `down_s`, start it again on the same port and data dir (the
        append-only file is replayed)."""
        self.proc.send_signal(sig)
        self.proc.wait(30)
        time.sleep(down_s)
        self.start()

    def _make_certificate(self) -> str:
        cert = Path(self.dir) / "cert.pem"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
                str(Path(self.dir) / "key.pem"),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
        return str(cert)

    def url(self, db: int, password: bool = True) -> str:
        """The URL of db `db`, with the password unless password=False (for TINKERBELL_REDIS_PASSWORD to add)."""
        auth = f":{quote(self.password, safe='')}@" if self.password and password else ""
        if self.ca_file is not None:
            return f"rediss://{auth}127.0.0.1:{self.port}/{db}?ssl_cert_reqs=required&ssl_ca_certs={self.ca_file}"
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _redis_ping(port: int, password: str | None = None, ca_file: str | None = None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw:
            context = ssl.create_default_context(cafile=ca_file) if ca_file else None
            s = context.wrap_socket(raw, server_hostname="127.0.0.1") if context else raw
            if password:
                s.sendall(f"AUTH {password}\r\n".encode())
                if not s.recv(16).startswith(b"+OK"):
                    return False
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not come up in {timeout}s")


def engine_stats_after(stack: Stack, since: float, timeout: float = 10) -> dict:
    """The (single) worker engine's counters from a heartbeat sent after `since` (epoch seconds)."""
    seen: dict = {}

    def fresh() -> bool:
        [worker] = stack.registry().live_workers()
        if worker["heartbeat"] <= since:
            return False
        seen.update(worker["engine"]["stats"])
        return True

    wait_for(fresh, timeout, "a worker heartbeat")
    return seen


@dataclass
class Stack:
    """One Tinkerbell deployment on Redis db `db`: workers + API, each a real process."""

    redis: RedisServer
    db: int
    models_dir: Path
    data_dir: Path
    base_model: str = TINY_MODEL
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    port: int = 0

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "TINKERBELL_BROKER_URL": self.redis.url(self.db),
                "TINKERBELL_DATA_DIR": str(self.data_dir),
                "TINKERBELL_MODELS_DIR": str(self.models_dir),
                "TINKERBELL_BASE_MODEL": self.base_model,
                "TINKERBELL_HEARTBEAT_S": "1",
                "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(ROOT),
            }
        )
        env.update(self.extra_env)
        return env

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def registry(self):
        from core.registry import Registry
        from core.settings import Settings

        return Registry(Settings.from_env(self.env))

    def start_worker(
        self,
        name: str,
        wait: bool = True,
        python: str | None = None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.Popen:
        """A worker process: `python` (default this interpreter; e.g. the vLLM venv's), extra CLI `args`
        (e.g. ["--role", "sample"]) and `env` on top of the stack's."""
        command = [
            python or sys.executable,
            "-m",
            "tasks.worker",
            "--device",
            "cpu",
            "--name",
            name,
            "--loglevel",
            "INFO",
            *(args or []),
        ]
        with open(self.data_dir / f"worker-{name}.log", "ab") as log:  # the child keeps its own copy of the fd
            proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**self.env, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[f"worker-{name}"] = proc
        if wait:
            registry = self.registry()
            wait_for(
                lambda: (
                    any(w["name"] == name for w in registry.live_workers())
                    and registry.redis.exists("tb:losses:builtin")
                    or proc.poll() is not None
                ),
                timeout,
                f"worker {name}",
            )
            if proc.poll() is not None:
                raise RuntimeError(
                    f"worker {name} exited: {(self.data_dir / f'worker-{name}.log').read_text()[-3000:]}"
                )
        return proc

    def stop_worker(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(f"worker-{name}")
        _kill(proc, sig)

    def start_api(self, port: int | None = None, workers: int = 1) -> None:
        """The API on `port` (default: a free one; give the old port to restart it where its clients look), with
        `workers` gunicorn worker processes (production runs api/gunicorn_conf.py's 2)."""
        self.port = port or free_port()
        env = {
            **self.env,
            "TINKERBELL_PORT": str(self.port),
            "TINKERBELL_POLL_TIMEOUT_S": self.extra_env.get("TINKERBELL_POLL_TIMEOUT_S", "5"),
        }
        with open(self.data_dir / "api.log", "ab") as log:
            # The production server (gunicorn, gthread), as docker compose and the local stack run it.
            command = [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                str(ROOT / "api" / "gunicorn_conf.py"),
                "--workers",
                str(workers),
                "api:create_app()",
            ]
            self.procs["api"] = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for(lambda: _http_ok(self.url + "/healthz") or self.procs["api"].poll() is not None, 60, "api")
        if self.procs["api"].poll() is not None:
            raise RuntimeError("api exited: " + (self.data_dir / "api.log").read_text()[-3000:])

    def stop_api(self, sig: int = signal.SIGTERM) -> None:
        """Signal the API's process group (the gunicorn master and its workers) and wait for it to exit."""
        _kill(self.procs.pop("api"), sig)

    def stop(self) -> None:
        for proc in self.procs.values():
            _kill(proc, signal.SIGTERM)
        self.procs.clear()


def _kill(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


def _http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False
