"""Placement across workers, per-adapter queues, and restoring adapters when a worker restarts."""

from __future__ import annotations

import signal

from client import TinkerbellClient
from core.settings import Settings
from tasks.celery_app import make_app, result_backend
from tests.test_service import make_datum


def ran_on(stack, request_id: str) -> str:
    """The worker that executed a task: the one whose Celery log says it received it."""
    workers = [name.removeprefix("worker-") for name in stack.procs if name.startswith("worker-")]
    return next(w for w in workers if f"[{request_id}] received" in (stack.data_dir / f"worker-{w}.log").read_text())


def results(stack):
    """Celery's result backend of the stack."""
    settings = Settings.from_env(stack.env)
    return result_backend(make_app(settings), settings)


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


def test_a_step_the_client_saw_succeed_survives_a_sigkill_right_after_its_result(make_stack):
    """The optim_step's result is published only once its autosave is on disk: killed the moment the result is
    seen, the restarted adapter has that step (equal to one that never crashed), not the state before it."""
    import json

    stack = make_stack(1, {"TINKERBELL_AUTH": "off"})
    tb = TinkerbellClient(stack.url, api_key="tml-x")
    crashed, reference = (tb.add_lora(rank=4, seed=2).result(120)["model_id"] for _ in range(2))
    datum = make_datum(4)
    for model_id in (reference, crashed):  # the crashed adapter's last optim_step is the last request it sees
        for _ in range(3):
            tb.forward_backward(model_id, [datum]).result(60)
            tb.optim_step(model_id, learning_rate=1e-2).result(60)
    info = json.loads((stack.data_dir / "autosave" / crashed / "tinkerbell-autosave.json").read_text())
    stack.stop_worker("w0", signal.SIGKILL)
    assert info["seq_id"] == 6, info  # create is not numbered; 3 x (forward_backward, optim_step)
    stack.start_worker("w0")
    losses = [tb.forward(m, [datum]).result(60)["metrics"]["loss:sum"] for m in (crashed, reference)]
    assert abs(losses[0] - losses[1]) < 1e-6


def test_requests_in_flight_when_a_worker_is_killed_run_when_it_restarts(make_stack):
    """A worker killed mid-task: its unacked request goes back to the front of the adapter's queue when the worker
    starts again (not after the broker's hour-long visibility timeout), and runs before the requests behind it."""
    import time

    import redis

    stack = make_stack(1, {"TINKERBELL_AUTH": "off"})
    tb = TinkerbellClient(stack.url, api_key="tml-x")
    model_id = tb.add_lora(rank=4, seed=1).result(120)["model_id"]
    broker = redis.Redis.from_url(stack.env["TINKERBELL_BROKER_URL"])
    big = [make_datum(i, length=256) for i in range(4)]  # a few seconds of CPU on the tiny model
    slow = tb.forward_backward(model_id, big)
    deadline = time.monotonic() + 60
    while not broker.hlen("unacked") and time.monotonic() < deadline:  # the worker has taken it and is running it
        time.sleep(0.02)
    assert broker.hlen("unacked") == 1, "the worker never took the request"
    stack.stop_worker("w0", signal.SIGKILL)
    behind = tb.forward_backward(model_id, [make_datum(1)])  # queued while the worker is down
    assert broker.hlen("unacked") == 1 and broker.llen(f"adapter.{model_id}") == 1

    stack.start_worker("w0")
    first, second = slow.result(120), behind.result(120)
    assert first["metrics"]["loss:sum"] > 0 and second["metrics"]["loss:sum"] > 0
    deadline = time.monotonic() + 10  # a worker acks right after it stores the result, which the client may see first
    while broker.hlen("unacked") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert broker.hlen("unacked") == 0
    done = [results(stack).get_task_meta(f.request_id)["date_done"] for f in (slow, behind)]
    assert done[0] < done[1], "the restored request ran after the one queued behind it"
    assert "restored 1 request(s) in flight" in (stack.data_dir / "worker-w0.log").read_text()


def test_optim_step_after_a_worker_lost_accumulated_gradients_fails_clearly_then_training_goes_on(make_stack):
    """forward_backward answered, then the worker dies before optim_step: the restored adapter (state after the last
    optim_step) has no gradients. The optim_step says so instead of stepping on nothing; redone, training matches
    an adapter that never saw the crash."""
    import pytest

    from client import UserInputError

    stack = make_stack(1, {"TINKERBELL_AUTH": "off"})
    tb = TinkerbellClient(stack.url, api_key="tml-x")
    crashed, reference = (tb.add_lora(rank=4, seed=3).result(120)["model_id"] for _ in range(2))
    datum = make_datum(7)
    tb.forward_backward(crashed, [datum]).result(60)
    stack.stop_worker("w0", signal.SIGKILL)
    stack.start_worker("w0")

    with pytest.raises(UserInputError, match="gradients of forward_backward calls from seq_id 1 on were lost"):
        tb.optim_step(crashed, learning_rate=1e-2).result(60)
    for model_id in (crashed, reference):
        tb.forward_backward(model_id, [datum]).result(60)
        tb.optim_step(model_id, learning_rate=1e-2).result(60)
    losses = [tb.forward(model_id, [datum]).result(60)["metrics"]["loss:sum"] for model_id in (crashed, reference)]
    assert abs(losses[0] - losses[1]) < 1e-6

    stack.stop_worker("w0", signal.SIGKILL)  # restarted again with nothing pending: optim_step just runs
    stack.start_worker("w0")
    tb.forward_backward(crashed, [datum]).result(60)
    assert "grad_norm:mean" in tb.optim_step(crashed, learning_rate=1e-2).result(60)["metrics"]
