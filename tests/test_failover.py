"""A worker that dies for good: its adapters move to a live worker, restored from their last autosave with optimizer
state; their queued requests follow and the SDK loop finishes. What the death lost is a failed future that says so,
and the old worker, started again under its name, does not take the adapter back. Real processes, real SIGKILL."""

from __future__ import annotations

import re
import signal
import threading
import time

import redis
import tinker
import torch

from tests.stackutil import TINY_MODEL, wait_for
from tests.test_parking import ADAM, saved_state, steps
from tests.test_tinker_sdk import make_datum

KEY = "tml-failover"
STEPS = 8
LOST = re.compile(
    r"gradients of forward_backward calls from seq_id \d+ on were lost|was already applied|was lost when worker"
)


def loop(training: tinker.TrainingClient, datums: list[tinker.Datum], outcomes: list[dict]) -> None:
    """The user's loop: a step is a forward_backward and an optim_step; a failed future is noted and the loop goes
    on with the next step."""
    for datum in datums:
        fwdbwd = training.forward_backward([datum], "cross_entropy")
        optim = training.optim_step(ADAM)
        outcome = {}
        for name, future in (("fwdbwd", fwdbwd), ("optim", optim)):
            try:
                future.result(timeout=300)
                outcome[name] = "ok"
            except tinker.TinkerError as exc:
                outcome[name] = str(exc)
        outcomes.append(outcome)


def test_a_dead_workers_adapter_moves_and_the_loop_finishes_losing_only_what_it_was_told(make_stack):
    stack = make_stack(
        2,
        {
            "TINKERBELL_AUTH": "off",
            # Heartbeat every 1 s (stackutil); dead after 8 s without one (a loaded 2-core machine delays beats).
            "TINKERBELL_WORKER_DEAD_S": "8",
            "TINKERBELL_SWEEP_S": "0.5",
        },
    )
    registry = stack.registry()
    broker = redis.Redis.from_url(stack.env["TINKERBELL_BROKER_URL"])
    service = tinker.ServiceClient(base_url=stack.url, api_key=KEY)
    moved = service.create_lora_training_client(TINY_MODEL, rank=4, seed=5).result(timeout=120)
    holder = registry.placement(moved.model_id).worker
    assert holder in ("w0", "w1")
    survivor = ({"w0", "w1"} - {holder}).pop()

    datums = [make_datum(seed, length=256) for seed in range(STEPS)]  # long enough to be caught mid-request
    outcomes: list[dict] = []
    user = threading.Thread(target=loop, args=(moved, datums, outcomes), daemon=True)
    user.start()
    wait_for(lambda: len(outcomes) >= 3, 300, "three steps")
    # Kill the holder while it has a request of the adapter in hand (taken from the queue, not yet acknowledged).
    wait_for(lambda: broker.hlen("unacked") > 0 or len(outcomes) == STEPS, 120, "a request in flight")
    stack.stop_worker(holder, signal.SIGKILL)
    killed_after = len(outcomes)
    user.join(600)
    assert not user.is_alive() and len(outcomes) == STEPS, outcomes
    assert killed_after < STEPS, "the loop finished before the kill: nothing was in flight"

    placement = registry.placement(moved.model_id)
    assert placement.worker == survivor and placement.epoch == 3  # 1: created, 2: taken from the dead, 3: placed
    # Every failure says what was lost; no step failed otherwise.
    failures = [text for outcome in outcomes for text in outcome.values() if text != "ok"]
    assert all(LOST.search(text) for text in failures), failures
    # The adapter equals a run that lost exactly what the failures said: a forward_backward counts when it succeeded
    # or was refused as "already applied" (it reached the autosave, its answer died with the worker); an optim_step
    # likewise steps on the gradients gathered since the last one; "gradients ... lost" drops those; a request "lost
    # when worker ... died" ran nothing.
    reference = service.create_lora_training_client(TINY_MODEL, rank=4, seed=5).result(timeout=120)
    gathered: list[tinker.Datum] = []
    for datum, outcome in zip(datums, outcomes):
        if outcome["fwdbwd"] == "ok" or "was already applied" in outcome["fwdbwd"]:
            gathered.append(datum)
        if outcome["optim"] == "ok" or "was already applied" in outcome["optim"]:
            for earlier in gathered:
                reference.forward_backward([earlier], "cross_entropy").result(timeout=120)
            reference.optim_step(ADAM).result(timeout=120)
            gathered = []
        elif "gradients of forward_backward" in outcome["optim"]:
            gathered = []
    want, got = saved_state(stack, reference, "end"), saved_state(stack, moved, "end")
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name

    # The dead worker comes back under its old name: it holds nothing, and the adapter stays with its new holder.
    log = stack.data_dir / f"worker-{holder}.log"
    start = log.stat().st_size
    stack.start_worker(holder)
    steps(moved, [make_datum(99, length=256)])  # training goes on, on the new holder
    time.sleep(2)  # four of the old worker's sweeps and two heartbeats: it must not touch the adapter meanwhile
    assert registry.worker_adapters(holder) == [] and registry.placement(moved.model_id).worker == survivor
    assert moved.model_id not in log.read_text()[start:], "the old worker touched the moved adapter"

    # Fenced: with its old epoch, the old holder can neither write the model's record nor park it.
    assert not registry.update_owned(moved.model_id, holder, 1, applied_seq=0)
    assert registry.park(moved.model_id, holder, 1, 0) == -1
    assert registry.model_any(moved.model_id)["applied_seq"] > 0
    service.close("success").result(timeout=30)
