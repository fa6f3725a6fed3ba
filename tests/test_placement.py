"""Placement across workers, per-adapter queues, and restoring adapters when a worker restarts."""

from __future__ import annotations

import signal

from client import TinkerbellClient
from tasks.celery_app import ResultBackend
from tasks.celery_app import app as celery_app
from tests.test_service import make_datum


def ran_on(stack, request_id: str) -> str:
    """The Celery node that executed a task, as its stored result records it."""
    backend = ResultBackend(app=celery_app, url=stack.env["TINKERBELL_BROKER_URL"])
    return backend.get_task_meta(request_id)["worker"].split("@")[0]


def test_two_workers_four_adapters_two_each_and_tasks_run_on_owner(make_stack):
    stack = make_stack(2, {"TINKERBELL_AUTH": "off"})
    tb = TinkerbellClient(stack.url, api_key="tml-x")
    model_ids = [tb.add_lora(rank=4, seed=i).result(120)["model_id"] for i in range(4)]
    registry = stack.registry()
    owners = {m: registry.model_any(m)["worker"] for m in model_ids}
    assert sorted(owners.values()) == ["w0", "w0", "w1", "w1"]
    for model_id in model_ids:
        for step in range(2):
            fb = tb.forward_backward(model_id, [make_datum(step)])
            opt = tb.optim_step(model_id, learning_rate=1e-2)
            fb.result(60), opt.result(60)
            assert ran_on(stack, fb.request_id) == owners[model_id]
            assert ran_on(stack, opt.request_id) == owners[model_id]


def test_restarted_worker_restores_its_adapters_from_autosave(make_stack):
    stack = make_stack(1, {"TINKERBELL_AUTH": "off"})
    tb = TinkerbellClient(stack.url, api_key="tml-x")
    model_id = tb.add_lora(rank=4, seed=1).result(120)["model_id"]
    datum = make_datum(5)
    for _ in range(3):
        tb.forward_backward(model_id, [datum]).result(60)
        tb.optim_step(model_id, learning_rate=1e-2).result(60)
    before = tb.forward(model_id, [datum]).result(60)["metrics"]["loss:sum"]
    stack.stop_worker("w0", signal.SIGKILL)
    stack.start_worker("w0")
    after = tb.forward(model_id, [datum]).result(60)["metrics"]["loss:sum"]
    assert abs(after - before) < 1e-5
