"""The request path below the API on a real Redis: the atomic admission script and its outbox, the messages Celery's
send_task makes from them, the sweep that publishes what an API process died before publishing, the result
backend's guarantees the long-poll relies on, and putting back a killed worker's unacked messages."""

from __future__ import annotations

import base64
import json

import msgpack
import pytest
import redis
from kombu import Connection

from api.service import Service, decode_message, encode_message
from core.errors import NotFound
from core.registry import OUTBOX, Registry
from core.settings import Settings
from tasks.broker import restore_own_unacked
from tasks.celery_app import adapter_queue, make_app, result_backend, sample_queue

DB = 63  # the tests' redis-server has 64 dbs; stacks count up from 1
MODEL = "s:train:0"


@pytest.fixture
def url(redis_server) -> str:
    redis.Redis.from_url(redis_server.url(DB)).flushdb()
    return redis_server.url(DB)


def model_registry(url: str, owner: str = "alice", model_id: str = MODEL) -> Registry:
    registry = Registry(Settings.from_env({"TINKERBELL_BROKER_URL": url}))
    registry._put(f"model:{model_id}", {"owner": owner})
    return registry


@pytest.fixture
def service(url: str):
    settings = Settings.from_env({"TINKERBELL_BROKER_URL": url})
    celery = make_app(settings, results=False)
    yield Service(settings, model_registry(url), celery, result_backend(celery, settings))
    celery.close()


def ids(outgoing: list) -> list[str]:
    return [item.request_id for item in outgoing]


def queued(url: str, queue: str) -> list[dict]:
    """The broker messages on a queue, in the order a worker's BRPOP takes them."""
    return [json.loads(raw) for raw in reversed(redis.Redis.from_url(url).lrange(queue, 0, -1))]


def test_submit_holds_a_gap_then_releases_in_seq_order_once(url: str) -> None:
    registry, queue = model_registry(url), adapter_queue(MODEL)

    assert registry.submit(MODEL, 2, "r2", "m2", queue, "alice", "forward_backward") == ("r2", [])  # seq 1 missing
    answer, ready = registry.submit(MODEL, 1, "r1", "m1", queue, "alice", "optim_step")
    assert answer == "r1" and ids(ready) == ["r1", "r2"]  # in seq order, each with its own message
    assert [(item.queue, item.message) for item in ready] == [(queue, "m1"), (queue, "m2")]
    assert sorted(registry.redis.hkeys(OUTBOX)) == ["r1", "r2"]  # until api/ marks them published

    assert registry.submit(MODEL, 1, "r1-again", "m1-again", queue, "alice") == ("r1", [])  # a re-send: first id
    assert registry.future("r2", "alice")["kind"] == "forward_backward"
    with pytest.raises(NotFound):
        registry.future("r1-again", "alice")

    assert registry.submit(MODEL, 4, "r4", "m4", queue, "alice")[1] == []
    _, ready = registry.submit(MODEL, 3, "skipped", "", queue, None)  # a refused seq_id runs nothing, releases the rest
    assert ids(ready) == ["r4"]
    registry.mark_published(["r1", "r2", "r4"])
    assert registry.redis.hlen(OUTBOX) == 0 and registry.claim_unpublished(0.0) == []


def test_submit_refuses_another_owners_or_a_removed_model(url: str) -> None:
    registry, queue = model_registry(url), adapter_queue(MODEL)
    with pytest.raises(NotFound, match="model_id"):
        registry.submit(MODEL, 1, "r1", "m1", queue, "mallory")
    with pytest.raises(NotFound, match="model_id"):
        registry.next_seq(MODEL, "mallory")
    registry._put(f"model:{MODEL}", {"deleted": True})
    with pytest.raises(NotFound):
        registry.submit(MODEL, 1, "r1", "m1", queue, "alice")
    assert registry.redis.hlen(OUTBOX) == 0


def test_next_seq_follows_everything_admitted_or_handed_out(url: str) -> None:
    registry, queue = model_registry(url), adapter_queue(MODEL)
    registry.submit(MODEL, 5, "r5", "m5", queue, "alice")
    assert registry.next_seq(MODEL, "alice") == 6
    assert registry.next_seq(MODEL, "alice") == 7


def test_api_publishes_with_send_task_in_seq_order_and_flower_gets_a_summary(url: str, service: Service) -> None:
    """What lands on the adapter's queue is Celery's own message for the task, its id the request id, its
    arguments the real ones and its kwargsrepr the short summary; nothing is left in the outbox."""
    data = [{"tokens": {"data": b"\x01\x00\x00\x00", "dtype": "int32", "shape": [1]}}]
    step, fwdbwd = {"model_id": MODEL}, {"model_id": MODEL, "data": data}
    held = service.submit_ordered("alice", MODEL, 2, "tinkerbell.optim_step", step, "optim_step", {"lr": 0.1})
    assert queued(url, adapter_queue(MODEL)) == []  # seq 1 has not come
    first = service.submit_ordered("alice", MODEL, 1, "tinkerbell.forward_backward", fwdbwd, "fwdbwd", {"batch": "1x1"})
    messages = queued(url, adapter_queue(MODEL))
    assert [m["headers"]["id"] for m in messages] == [first, held]
    assert [m["headers"]["task"] for m in messages] == ["tinkerbell.forward_backward", "tinkerbell.optim_step"]
    args, kwargs, _embed = msgpack.unpackb(base64.b64decode(messages[0]["body"]))
    assert args == [] and kwargs == {"model_id": MODEL, "data": data, "seq_id": 1}
    assert json.loads(messages[0]["headers"]["kwargsrepr"]) == {"batch": "1x1", "seq_id": 1}
    assert messages[0]["headers"]["argsrepr"] == "()"
    assert messages[0]["properties"]["delivery_info"]["routing_key"] == adapter_queue(MODEL)
    assert service.registry.redis.hlen(OUTBOX) == 0
    assert service.sweep(older_than_s=0.0) == 0


def test_sweep_publishes_what_was_admitted_but_never_published(url: str, service: Service) -> None:
    """An API process that dies between the admission script and send_task leaves the request in the outbox: a
    sweep publishes it (once, whichever API process sweeps first), after the grace period only."""
    registry, queue = service.registry, adapter_queue(MODEL)
    message = encode_message("tinkerbell.optim_step", {"model_id": MODEL, "seq_id": 1}, '{"seq_id": 1}')
    registry.submit(MODEL, 1, "lost", message, queue, "alice", "optim_step")  # ... and the process died here
    sample = encode_message("tinkerbell.sample", {"num_samples": 1}, "{}")
    registry.push(sample_queue("base"), sample, "lost-sample", "alice", "sample")
    assert decode_message(message) == ("tinkerbell.optim_step", {"model_id": MODEL, "seq_id": 1}, '{"seq_id": 1}')

    assert service.sweep() == 0  # within the grace period the process that admitted it may still be publishing
    assert service.sweep(older_than_s=0.0) == 2
    assert [m["headers"]["id"] for m in queued(url, queue)] == ["lost"]
    assert [m["headers"]["id"] for m in queued(url, sample_queue("base"))] == ["lost-sample"]
    assert service.sweep(older_than_s=0.0) == 0 and registry.redis.hlen(OUTBOX) == 0

    registry.push(queue, message, "claimed", "alice", "optim_step")
    assert ids(registry.claim_unpublished(0.0)) == ["claimed"]
    assert registry.claim_unpublished(1.0) == []  # claimed by the first sweep: another one leaves it alone


def test_result_store_never_overwrites_a_success_and_publishes_what_it_stores(url: str) -> None:
    """api/futures.py relies on Celery's Redis backend for both."""
    settings = Settings.from_env({"TINKERBELL_BROKER_URL": url})
    backend = result_backend(make_app(settings), settings)
    key = backend.get_key_for_task("t1")
    pubsub = backend.client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(key)
    backend.store_result("t1", {"logprobs": b"\x00\x01", "loss": 1.5}, "SUCCESS")
    message = None
    while message is None:
        message = pubsub.get_message(timeout=5)
    assert message["data"] == backend.client.get(key)
    assert backend.decode_result(message["data"])["result"] == {"logprobs": b"\x00\x01", "loss": 1.5}
    assert 0 < backend.client.ttl(key) <= backend.expires

    backend.store_result("t1", RuntimeError("a lost duplicate failed"), "FAILURE")
    assert backend.get_task_meta("t1")["status"] == "SUCCESS"
    backend.store_result("t2", RuntimeError("first try failed"), "FAILURE")
    backend.store_result("t2", 7, "SUCCESS")
    assert backend.get_task_meta("t2")["result"] == 7
    pubsub.close()


def test_a_restarted_worker_puts_back_only_its_own_queues_unacked_messages(url: str) -> None:
    """kombu's own records of messages a killed worker had taken: restore_own_unacked puts those of the given
    queues back where the next read takes them first, and leaves other queues' records alone."""
    celery = make_app(Settings.from_env({"TINKERBELL_BROKER_URL": url}), results=False)
    mine, other = adapter_queue("s:train:1"), adapter_queue("s:train:2")
    for task_id, queue in (("taken", mine), ("behind", mine), ("elsewhere", other)):
        celery.send_task("tinkerbell.optim_step", kwargs={}, task_id=task_id, queue=queue)
    killed = Connection(url)  # a worker that takes a message from each queue, then dies without acking
    channel = killed.channel()
    taken = [channel.basic_get(queue, no_ack=False) for queue in (mine, other)]
    assert [m.headers["id"] for m in taken] == ["taken", "elsewhere"]
    client = redis.Redis.from_url(url)
    assert client.hlen("unacked") == 2 and client.llen(mine) == 1

    with Connection(url) as restarted:
        assert restore_own_unacked(restarted, {mine, adapter_queue("s:train:9")}) == ["taken"]
        assert client.hlen("unacked") == 1  # the other queue's record is its owner's business
        first = restarted.default_channel.basic_get(mine, no_ack=True)
        assert first.headers["id"] == "taken" and first.delivery_info["redelivered"]
    killed.release()  # kombu's graceful close would have restored them itself
    celery.close()
