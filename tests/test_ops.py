"""Operations on a real stack: /metrics, celery inspect/control, the status page in headless Chromium, Flower's task
list."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from client import TinkerbellClient
from core.settings import Settings
from tasks.celery_app import make_app
from tests.stackutil import ROOT, Stack, free_port, wait_for

ADAM = {"learning_rate": 1e-2}
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def scrape(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}, through prometheus_client's own parser."""
    response = requests.get(stack.url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def control_app(stack: Stack) -> Celery:
    """The service's Celery app, made from the stack's settings, as an operator's `celery -A tasks` would be."""
    return make_app(Settings.from_env(stack.env))


def node_name(worker: str) -> str:
    return f"{worker}@{socket.gethostname()}"


def active_queue_names(app: Celery, worker: str) -> set[str]:
    replies = app.control.inspect(destination=[node_name(worker)], timeout=5).active_queues() or {}
    assert node_name(worker) in replies, f"no reply from {node_name(worker)}: {replies}"
    return {queue["name"] for queue in replies[node_name(worker)]}


def datum(seed: int, length: int = 10) -> dict:
    tokens = [(seed * 37 + 11 * i) % 1500 + 5 for i in range(length + 1)]
    return {"model_input": tokens[:-1], "loss_fn_inputs": {"target_tokens": tokens[1:], "weights": [1.0] * length}}


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("headless Chromium is required for the status-page test: apt-get install -y chromium")


@pytest.fixture(scope="module")
def tb(stack: Stack) -> TinkerbellClient:
    return TinkerbellClient(stack.url, api_key="tml-ops")


@pytest.fixture(scope="module")
def celery_control(stack: Stack):
    app = control_app(stack)
    yield app
    app.close()


@pytest.fixture(scope="module")
def flower(stack: Stack):
    """Flower on the stack's broker, started before the training step so it sees the task events."""
    port = free_port()
    env = {**stack.env, "FLOWER_BASIC_AUTH": "ops:secret"}
    log = open(stack.data_dir / "flower.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tasks", "flower", f"--port={port}", "--address=127.0.0.1"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def workers_listed() -> bool:
        try:
            answer = requests.get(url + "/api/workers", params={"refresh": "true"}, auth=("ops", "secret"), timeout=5)
            return answer.status_code == 200 and node_name("w0") in answer.json()
        except requests.RequestException:
            return False

    try:
        wait_for(lambda: workers_listed() or proc.poll() is not None, 60, "flower")
        assert proc.poll() is None, (stack.data_dir / "flower.log").read_text()[-3000:]
        assert requests.get(url + "/api/workers", timeout=5).status_code == 401  # the login is required
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
        log.close()


@pytest.fixture(scope="module")
def trained(stack: Stack, tb: TinkerbellClient, celery_control: Celery, flower: str) -> dict:
    """One adapter, one training step; the metrics before and after."""
    before = scrape(stack)
    model_id = tb.add_lora(rank=4, seed=1).result(120)["model_id"]
    queues_after_create = active_queue_names(celery_control, "w0")
    batch = [datum(1), datum(2, 7)]
    tb.forward_backward(model_id, batch).result(120)
    tb.optim_step(model_id, **ADAM).result(120)
    sampled = tb.sample(datum(4)["model_input"], max_tokens=4, temperature=0.0, stop=[]).result(
        120
    )  # stop=[]: 4 tokens
    after = scrape(stack)
    tokens = sum(len(d["model_input"]) for d in batch)
    return {
        "model_id": model_id,
        "before": before,
        "after": after,
        "tokens": tokens,
        "queues": queues_after_create,
        "sampled": sum(len(s["tokens"]) for s in sampled["sequences"]),
    }


def test_metrics_counters_move_after_a_training_step(trained: dict) -> None:
    before, after, model_id = trained["before"], trained["after"], trained["model_id"]
    assert value(after, "tinkerbell_redis_up") == 1
    assert (
        value(after, "tinkerbell_tokens_trained_total") - value(before, "tinkerbell_tokens_trained_total")
        == trained["tokens"]
    )
    assert trained["sampled"] > 0
    assert (
        value(after, "tinkerbell_tokens_sampled_total") - value(before, "tinkerbell_tokens_sampled_total")
        == trained["sampled"]
    )
    for route in ("/add_lora", "/fwdbwd", "/optim_step"):
        assert (
            value(after, "tinkerbell_http_requests_total", method="POST", route=route, status="200")
            >= value(before, "tinkerbell_http_requests_total", method="POST", route=route, status="200") + 1
        )
        count = value(after, "tinkerbell_http_request_duration_seconds_count", method="POST", route=route)
        assert count >= 1
        assert (
            value(after, "tinkerbell_http_request_duration_seconds_bucket", method="POST", route=route, le="+Inf")
            == count
        )
        assert value(after, "tinkerbell_http_request_duration_seconds_sum", method="POST", route=route) > 0
    polls = value(after, "tinkerbell_http_requests_total", method="POST", route="/retrieve_future", status="200")
    assert polls > value(
        before, "tinkerbell_http_requests_total", method="POST", route="/retrieve_future", status="200"
    )
    assert value(after, "tinkerbell_workers_alive") >= 1
    assert value(after, "tinkerbell_worker_adapters", worker="w0", device="cpu") >= 1
    assert (("tinkerbell_queue_depth", (("kind", "adapter"), ("queue", f"adapter.{model_id}")))) in after
    assert value(after, "tinkerbell_queue_depth", kind="worker", queue="worker.w0") == 0
    assert value(after, "tinkerbell_futures_pending") == 0  # every future above was waited for


def test_metrics_count_errors_by_status(stack: Stack) -> None:
    before = scrape(stack)
    assert (
        requests.post(
            stack.url + "/fwdbwd",
            json={"model_id": "nope:train:0", "data": [datum(3)]},
            headers={"X-API-Key": "tml-ops"},
            timeout=10,
        ).status_code
        == 404
    )
    after = scrape(stack)
    labels = {"method": "POST", "route": "/fwdbwd", "status": "404"}
    assert (
        value(after, "tinkerbell_http_requests_total", **labels)
        == value(before, "tinkerbell_http_requests_total", **labels) + 1
    )


def test_active_queues_show_the_adapter_queue(trained: dict, celery_control: Celery) -> None:
    assert f"adapter.{trained['model_id']}" in trained["queues"]
    assert "worker.w0" in trained["queues"]
    registered = celery_control.control.inspect(destination=[node_name("w0")], timeout=5).registered() or {}
    assert {"tinkerbell.forward_backward", "tinkerbell.optim_step", "tinkerbell.create_adapter"} <= set(
        registered[node_name("w0")]
    )


def test_status_page_in_headless_chromium(stack: Stack, trained: dict) -> None:
    chromium = chromium_binary()
    adapters = len(stack.registry().worker_adapters("w0"))
    assert adapters >= 1
    with tempfile.TemporaryDirectory(prefix="tb-chromium-") as profile:
        done = subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "--dump-dom",
                "--virtual-time-budget=5000",
                stack.url + "/",
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
    dom = done.stdout
    assert "<html" in dom, done.stderr[-3000:]
    assert re.search(r'id="state"[^>]*data-refreshes="\d+"', dom), f"the page never loaded status.json: {dom[:3000]}"
    row = re.search(r'<tr data-worker="w0">(.*?)</tr>', dom, re.DOTALL)
    assert row, f"worker w0 missing from the status page: {dom[:3000]}"
    assert '<td class="name">w0</td>' in row.group(1)
    assert '<td class="device">cpu</td>' in row.group(1)
    assert f'<td class="num adapters">{adapters}</td>' in row.group(1)
    assert re.search(r'POST</td><td>/fwdbwd</td><td class="s2">200</td>', dom), "recent requests missing"
    assert trained["model_id"] not in dom  # other keys' ids stay private: counts only


def test_status_page_is_public_and_leaks_no_ids(stack: Stack, trained: dict) -> None:
    page = requests.get(stack.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    doc = requests.get(stack.url + "/status.json", timeout=10).json()
    assert trained["model_id"] not in str(doc) and trained["model_id"].split(":")[0] not in str(doc)
    assert any(w["name"] == "w0" and w["adapters"] >= 1 for w in doc["workers"])


def test_status_json_refreshes_without_a_keyspace_scan(stack: Stack, trained: dict) -> None:
    """Every open status page asks every 2 s: it reads the live workers' queues by name, never SCANs Redis."""
    client = stack.registry().redis

    def scans() -> int:
        return int(client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))

    before = scans()
    for _ in range(3):
        assert requests.get(stack.url + "/status.json", timeout=10).json()["workers"]
    assert scans() == before
    scrape(stack)  # /metrics still scans, for the queues of workers that are gone: the count does see it
    assert scans() > before


def test_flower_lists_readable_tasks_without_arrays(stack: Stack, trained: dict, flower: str) -> None:
    def fetch() -> dict:
        return requests.get(
            flower + "/api/tasks",
            params={"taskname": "tinkerbell.forward_backward"},
            auth=("ops", "secret"),
            timeout=10,
        ).json()

    wait_for(
        lambda: any(t.get("kwargs") and trained["model_id"] in t["kwargs"] for t in fetch().values()),
        30,
        "the forward_backward task in Flower",
    )
    ours = [t for t in fetch().values() if trained["model_id"] in (t.get("kwargs") or "")]
    for task in ours:
        assert task["name"] == "tinkerbell.forward_backward"
        assert len(task["kwargs"]) < 300, task["kwargs"]
        assert (
            '"batch": "2x10"' in task["kwargs"] and "model_input" not in task["kwargs"] and "data" not in task["kwargs"]
        )
        assert task["args"] == "()"
        assert "\\x" not in (task.get("result") or ""), task["result"]  # results are shortened too: no raw bytes
        assert task["sent"], "no task-sent event: the API publishes with send_task and task_send_sent_event"
    workers = requests.get(flower + "/api/workers", auth=("ops", "secret"), timeout=10).json()
    assert node_name("w0") in workers


def test_active_queues_drop_the_adapter_after_remove(
    stack: Stack, tb: TinkerbellClient, trained: dict, celery_control: Celery
) -> None:
    tb.remove_lora(trained["model_id"]).result(120)
    queue = f"adapter.{trained['model_id']}"
    assert queue not in active_queue_names(celery_control, "w0")
    sample = ("tinkerbell_queue_depth", (("kind", "adapter"), ("queue", queue)))
    wait_for(lambda: sample not in scrape(stack), 10, f"{queue} to leave /metrics")


def test_metrics_agree_across_gunicorn_processes(stack: Stack, tmp_path: Path) -> None:
    """Two gunicorn processes answer from the same Redis: each /metrics sees every process's requests."""
    port = free_port()
    env = {**stack.env, "TINKERBELL_PORT": str(port), "TINKERBELL_AUTH": "off"}
    log = open(tmp_path / "gunicorn.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "api/gunicorn_conf.py", "--workers", "2", "api:create_app()"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ok(url + "/healthz") or proc.poll() is not None, 60, "gunicorn")
        assert proc.poll() is None, (tmp_path / "gunicorn.log").read_text()[-3000:]
        route = {"method": "GET", "route": "/get_server_capabilities", "status": "200"}
        start = value(_scrape_url(url), "tinkerbell_http_requests_total", **route)
        for _ in range(20):  # fresh connections: gunicorn spreads them over both processes
            assert (
                requests.get(url + "/get_server_capabilities", headers={"Connection": "close"}, timeout=10).status_code
                == 200
            )
        for _ in range(4):
            assert value(_scrape_url(url), "tinkerbell_http_requests_total", **route) >= start + 20
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
        log.close()


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def _scrape_url(url: str) -> dict:
    samples = {}
    for family in text_string_to_metric_families(
        requests.get(url + "/metrics", headers={"Connection": "close"}, timeout=10).text
    ):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_demo_fine_tunes_through_the_sdk(stack: Stack, tmp_path: Path) -> None:
    """examples/demo.py end to end on the tiny model against the running stack: samples, progress bar, loss PNG."""
    plot = tmp_path / "loss.png"
    env = {**stack.env, "HF_HOME": str(tmp_path / "hf"), "TINKER_TELEMETRY": "0"}
    done = subprocess.run(
        [
            sys.executable,
            "examples/demo.py",
            "--url",
            stack.url,
            "--base-model",
            stack.base_model,
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--plot",
            str(plot),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "before training  Q: What is the capital of France?" in done.stdout
    assert "after training   Q: What is the capital of France?" in done.stdout
    assert re.search(r"loss \d+\.\d+ -> \d+\.\d+ over 3 steps", done.stdout)
    assert re.search(r"3/3 \[.*loss=\d+\.\d+, tok_s=\d+", done.stderr)  # tqdm writes the bar to stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_status_shows_what_a_busy_worker_runs_where_inspect_active_cannot(stack: Stack, tb: TinkerbellClient) -> None:
    def running() -> list[str]:
        return [w["running"] for w in requests.get(stack.url + "/status.json", timeout=5).json()["workers"]]

    prompt = datum(3)["model_input"]  # the tiny model's context is 512 tokens
    # Each task must outlast the 1 s heartbeat by a margin on a fast machine too: 16 sequences of 480 tokens
    # (one sequence took under half a second here, and the status then missed both tasks now and again).
    futures = [tb.sample(prompt, max_tokens=480, temperature=0.0, stop=[], num_samples=16) for _ in range(2)]
    wait_for(
        lambda: any(r.startswith("sample for") for r in running()), 30, "the status page to show the running sample"
    )
    for future in futures:
        future.result(120)
    wait_for(lambda: running() == ["idle"], 10, "the status page to show the worker idle")
