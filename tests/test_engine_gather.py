"""The engine's gather window: a ready forward_backward waits a moment for the adapters that shared its last passes,
so concurrent clients' requests that arrive some 100 ms apart still share one pass; an adapter alone never waits.

The engine runs here in-process on the real HFTrainingBackend (tiny model); the backend is wrapped only to make a
pass take as long as a real model's does on a CPU (the window is capped at a quarter of the last pass's duration).
"""

from __future__ import annotations

import os
import time

import pytest

from backends.base import FwdBwdRequest, LoraSpec
from core.settings import Settings
from tasks.engine import FWD_BWD, Engine, Work
from tests.test_backend_hf import make_data, new_id
from tests.tiny_model import TINY_MODEL_NAME, build_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PASS_S = 0.4  # how long each pass takes here: a 1x128 SmolLM2 pass on this CPU takes about 1 s


class SlowPasses:
    """The real backend, each forward_backward call taking at least PASS_S; records the adapters of each call."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.passes: list[set[str]] = []

    def forward_backward(self, requests):
        self.passes.append({r.model_id for r in requests})
        time.sleep(PASS_S)
        return self.backend.forward_backward(requests)


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    from backends.hf_train import HFTrainingBackend

    models = tmp_path_factory.mktemp("gather-models")
    build_tiny_model(models / "tinkerbell" / "tiny-llama")
    settings = Settings(models_dir=str(models), data_dir=str(tmp_path_factory.mktemp("gather-data")), device="cpu")
    return SlowPasses(HFTrainingBackend(settings))


def engine_for(backend: SlowPasses, gather_s: float) -> Engine:
    engine = Engine(lambda: backend, lambda: None, lambda model_id: 0, lambda model_id, after, before: [])
    engine.gather_s = gather_s
    return engine


def fwd(model_id: str, seq_id: int) -> Work:
    return Work(FWD_BWD, FwdBwdRequest(model_id, make_data(seq_id, (6,))), model_id=model_id, seq_id=seq_id, tokens=6)


def adapters(backend: SlowPasses, n: int) -> list[str]:
    ids = [new_id() for _ in range(n)]
    for i, model_id in enumerate(ids):
        backend.backend.create_adapter(model_id, TINY_MODEL_NAME, LoraSpec(rank=4, alpha=8.0, seed=i))
    return ids


def first_pass_together(engine: Engine, ids: list[str]) -> None:
    """Seq 1 of every adapter handed over at once, before the engine thread starts: one pass holds them all."""
    works = [fwd(model_id, 1) for model_id in ids]
    engine._inbox.extend(works)
    engine.start()
    for work in works:
        work.future.result(60)


def second_round_apart(engine: Engine, ids: list[str]) -> None:
    """Seq 2 of every adapter, 30 ms apart as concurrent clients' next requests come; then the engine stops."""
    works = []
    for model_id in ids:
        works.append(fwd(model_id, 2))
        engine.submit(works[-1])
        time.sleep(0.03)
    for work in works:
        work.future.result(60)
    engine.stop()


def test_requests_arriving_apart_share_a_pass_when_their_adapters_shared_the_last_one(backend) -> None:
    engine = engine_for(backend, gather_s=0.5)
    ids = adapters(backend, 3)
    backend.passes.clear()
    first_pass_together(engine, ids)
    assert backend.passes == [set(ids)]
    second_round_apart(engine, ids)
    assert backend.passes == [set(ids), set(ids)], "the second round ran in more than one pass"
    assert engine.stats["gather_waits"] >= 1 and engine.stats["adapters_in_passes"] == 6


def test_without_the_window_the_first_arrival_runs_alone(backend) -> None:
    """The same arrivals with TINKERBELL_ENGINE_GATHER_S=0: what the window is for (this test fails if it is on)."""
    engine = engine_for(backend, gather_s=0.0)
    ids = adapters(backend, 3)
    backend.passes.clear()
    first_pass_together(engine, ids)
    second_round_apart(engine, ids)
    assert backend.passes[1] == {ids[0]} and len(backend.passes) == 3
    assert engine.stats["gather_waits"] == 0


def test_an_adapter_alone_never_waits(backend) -> None:
    engine = engine_for(backend, gather_s=5.0)
    [model_id] = adapters(backend, 1)
    first_pass_together(engine, [model_id])
    backend.passes.clear()
    work = fwd(model_id, 2)
    engine.submit(work)
    work.future.result(60)
    engine.stop()
    assert backend.passes == [{model_id}] and engine.stats["gather_waits"] == 0


def test_the_window_ends_when_a_partner_does_not_come(backend) -> None:
    """A partner of the last pass that sends nothing more holds the others back at most one window per pass."""
    engine = engine_for(backend, gather_s=0.05)
    ids = adapters(backend, 2)
    first_pass_together(engine, ids)
    backend.passes.clear()
    for seq in (2, 3, 4):  # only the first adapter goes on
        work = fwd(ids[0], seq)
        engine.submit(work)
        work.future.result(60)
    engine.stop()
    assert backend.passes == [{ids[0]}] * 3
    assert engine.stats["gather_waits"] <= 2, "the silent partner left the last two passes after two of them"
