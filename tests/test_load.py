"""Load, small: six official-SDK clients train their own adapters at once against two workers, four steps each; all
finish with no error, the adapters are spread over both workers, and each ends equal to training it alone in this
process with plain PEFT (every LoRA weight within 1e-5). bench/load.py runs the same workload at full size (32 x 20).
"""

from __future__ import annotations

from bench.load import TOLERANCE, max_difference, plan, run_clients, served_weights, train_alone

CLIENTS = 6
STEPS = 4


def test_six_concurrent_sdk_clients_on_two_workers_each_end_equal_to_training_alone(make_stack, models_dir):
    stack = make_stack(2, {"TINKERBELL_AUTH": "off"})
    outcomes, _ = run_clients(stack, CLIENTS, STEPS)
    assert [o.error for o in outcomes] == [None] * CLIENTS
    assert all(len(o.latencies_s) == 2 * STEPS for o in outcomes)
    owners = {o.model_id: o.holders for o in outcomes}  # read while each session was open (close parks them)
    assert all(len(names) == 1 for names in owners.values()), owners  # one owner each (DESIGN rule 2)
    assert {names[0] for names in owners.values()} == {"w0", "w1"}, owners
    for i, outcome in enumerate(outcomes):
        difference = max_difference(served_weights(stack, outcome.model_id), train_alone(models_dir, plan(i), STEPS))
        assert difference <= TOLERANCE, (i, difference)
