"""The API publishes an OpenAPI document (/openapi.json) that gives every JSON route its request body; schemathesis,
run from it against the real stack (gunicorn API, Redis, a Celery worker) with a bounded number of examples per
route, finds no 5xx and crashes no worker."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import requests

from api import create_app
from api.openapi import UNDOCUMENTED, bodies, openapi_path
from client import TinkerbellClient
from core.settings import Settings
from tests.test_hostile import LIMITS

KEY = "tml-openapi"
MAX_EXAMPLES = 15


@pytest.fixture(scope="module")
def fuzzed(make_stack):
    env = {name: str(value) for name, value in LIMITS.items()}
    return make_stack(1, {"TINKERBELL_AUTH": "off", "TINKERBELL_SEQ_GAP_TIMEOUT_S": "1", **env})


def test_every_json_route_has_its_request_body_in_the_document(fuzzed):
    app = create_app(Settings.from_env(fuzzed.env))
    known = bodies(app.config["SETTINGS"])
    missing = sorted(
        rule.rule
        for rule in app.url_map.iter_rules()
        if rule.methods & {"POST", "PUT"}
        and rule.endpoint not in UNDOCUMENTED | set(known) | {"tinker.tinker_rest.publish_checkpoint"}
    )
    assert not missing, f"add their request bodies to api/openapi.py bodies(): {missing}"
    document = requests.get(fuzzed.url + "/openapi.json", timeout=30).json()
    routes = {openapi_path(r.rule) for r in app.url_map.iter_rules() if r.endpoint not in UNDOCUMENTED}
    assert set(document["paths"]) == routes
    forward_backward = document["paths"]["/api/v1/forward_backward"]["post"]["requestBody"]["content"]
    assert forward_backward["application/json"]["schema"]["required"] == ["model_id", "forward_backward_input"]
    assert document["components"]["schemas"]["Data"]["maxItems"] == LIMITS["TINKERBELL_MAX_REQUEST_DATUMS"]


def real_ids(stack) -> dict[str, list[str]]:
    """Objects that exist, so that part of the generated cases name them and reach past the 404 of a random id."""
    tb = TinkerbellClient(stack.url, api_key=KEY)
    model_id = tb.add_lora(rank=4, seed=0).result(120)["model_id"]
    saved = tb.save_state(model_id, "fuzz").result(120)["path"]
    session = requests.post(stack.url + "/api/v1/create_session", json={}, headers={"X-API-Key": KEY}, timeout=30)
    datum = {"model_input": [1, 2, 3], "loss_fn_inputs": {"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]}}
    return {
        "model_ids": [model_id],
        "session_ids": [session.json()["session_id"]],
        "request_ids": [tb.forward_backward(model_id, [datum]).request_id],
        "paths": [saved],
    }


BINDINGS = {
    "model_ids": ["body.model_id", "path.run_id"],
    "session_ids": ["body.session_id", "path.session_id"],
    "request_ids": ["body.request_id"],
    "paths": ["body.path", "body.tinker_path", "body.source_path", "body.model_path"],
}


def schemathesis_config(ids: dict[str, list[str]]) -> str:
    """schemathesis.toml: each id field takes a real id in half the cases."""
    lines = []
    for name, values in ids.items():
        lines += [f"[dictionaries.{name}]", "values = [" + ", ".join(f'"{v}"' for v in values) + "]"]
    lines.append("[parameters]")
    for name, keys in BINDINGS.items():
        lines += [f'"{key}" = {{ dictionary = "{name}", probability = 0.5 }}' for key in keys]
    return "\n".join(lines) + "\n"


def test_schemathesis_finds_no_server_error_and_no_worker_dies(fuzzed, tmp_path):
    (tmp_path / "schemathesis.toml").write_text(schemathesis_config(real_ids(fuzzed)))
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        fuzzed.url + "/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "15",
        "--header",
        f"X-API-Key: {KEY}",
        "--request-timeout",
        "90",
        "--workers",
        "2",
        "--phases",
        "examples,fuzzing",  # the coverage phase's boundary cases alone are ~4000 requests: minutes here
        "--no-color",
    ]
    run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    (tmp_path / "schemathesis.txt").write_text(run.stdout)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    summary = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert summary and int(summary.group(1)) > 10 * MAX_EXAMPLES, run.stdout[-3000:]
    workers = requests.get(fuzzed.url + "/healthz", timeout=30).json()["workers"]
    assert [w["name"] for w in workers] == ["w0"]
    assert fuzzed.procs["worker-w0"].poll() is None
    tb = TinkerbellClient(fuzzed.url, api_key=KEY)
    model_id = tb.add_lora(rank=4, seed=1).result(120)["model_id"]  # the worker still trains
    datum = {"model_input": [1, 2, 3], "loss_fn_inputs": {"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]}}
    assert "loss:sum" in tb.forward_backward(model_id, [datum]).result(120)["metrics"]
