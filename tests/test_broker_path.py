"""The request path below the API on a real Redis: the atomic submit script, the broker messages api/ builds
instead of calling send_task, and the one-round-trip result store."""

from __future__ import annotations

import base64
import json
from typing import Any

import msgpack
import pytest
import redis
from celery import Celery

from core.errors import NotFound
from core.registry import Registry
from core.settings import Settings
from tasks.celery_app import ResultBackend, adapter_queue, task_message
from tasks.celery_app import app as celery_app

DB = 63  # the tests' redis-server has 64 dbs; stacks count up from 1


@pytest.fixture
def url(redis_server) -> str:
    redis.Redis.from_url(redis_server.url(DB)).flushdb()
    return redis_server.url(DB)


def test_task_message_is_what_send_task_pushes(url: str) -> None:
    queue = adapter_queue("s:train:0")
    kwargs = {"model_id": "s:train:0", "seq_id": 3, "data": [{"tokens": b"\x01\x02"}]}
    celery = Celery("tinkerbell", broker=url, backend=url, set_as_current=False)  # its own backend: send_task subscribes there
    celery.conf.update(task_serializer=celery_app.conf.task_serializer, accept_content=celery_app.conf.accept_content)
    celery.send_task("tinkerbell.forward_backward", kwargs=kwargs, task_id="by-celery", queue=queue, kwargsrepr='{"seq_id": 3}', argsrepr="()")
    client = redis.Redis.from_url(url)
    sent = json.loads(client.rpop(queue))
    ours = json.loads(task_message("tinkerbell.forward_backward", kwargs, "by-celery", queue, '{"seq_id": 3}'))

    assert {k: v for k, v in ours.items() if k not in ("body", "headers", "properties")} == {k: v for k, v in sent.items() if k not in ("body", "headers", "properties")}
    assert msgpack.unpackb(base64.b64decode(ours["body"])) == msgpack.unpackb(base64.b64decode(sent["body"]))
    assert {k: v for k, v in ours["headers"].items() if k != "origin"} == {k: v for k, v in sent["headers"].items() if k != "origin"}
    for key in ("correlation_id", "delivery_mode", "delivery_info", "priority", "body_encoding"):
        assert ours["properties"][key] == sent["properties"][key], key
    assert ours["properties"]["delivery_tag"] != sent["properties"]["delivery_tag"]  # unique per message


def model_registry(url: str, owner: str = "alice", model_id: str = "s:train:0") -> Registry:
    registry = Registry(Settings.from_env({"TINKERBELL_BROKER_URL": url}))
    registry._put(f"model:{model_id}", {"owner": owner})
    return registry


def test_submit_holds_a_gap_then_pushes_in_seq_order_once(url: str) -> None:
    registry, queue = model_registry(url), adapter_queue("s:train:0")
    client = redis.Redis.from_url(url, decode_responses=True)

    assert registry.submit("s:train:0", 2, "r2", "m2", queue, "alice", "forward_backward") == "r2"
    assert client.llen(queue) == 0  # seq 1 has not arrived
    assert registry.submit("s:train:0", 1, "r1", "m1", queue, "alice", "optim_step") == "r1"
    assert [client.rpop(queue), client.rpop(queue)] == ["m1", "m2"]  # a worker's BRPOP takes them in seq order

    assert registry.submit("s:train:0", 1, "r1-again", "m1-again", queue, "alice") == "r1"  # a re-send answers the first id
    assert client.llen(queue) == 0
    assert registry.future("r2", "alice")["kind"] == "forward_backward"
    with pytest.raises(NotFound):
        registry.future("r1-again", "alice")

    registry.submit("s:train:0", 4, "r4", "m4", queue, "alice")
    registry.submit("s:train:0", 3, "skipped", "", queue, None)  # a refused seq_id runs nothing, releases what waits
    assert client.lrange(queue, 0, -1) == ["m4"]


def test_submit_refuses_another_owners_or_a_removed_model(url: str) -> None:
    registry, queue = model_registry(url), adapter_queue("s:train:0")
    with pytest.raises(NotFound, match="model_id"):
        registry.submit("s:train:0", 1, "r1", "m1", queue, "mallory")
    with pytest.raises(NotFound, match="model_id"):
        registry.next_seq("s:train:0", "mallory")
    registry._put("model:s:train:0", {"deleted": True})
    with pytest.raises(NotFound):
        registry.submit("s:train:0", 1, "r1", "m1", queue, "alice")
    assert redis.Redis.from_url(url).llen(queue) == 0


def test_next_seq_follows_everything_admitted_or_handed_out(url: str) -> None:
    registry, queue = model_registry(url), adapter_queue("s:train:0")
    registry.submit("s:train:0", 5, "r5", "m5", queue, "alice")
    assert registry.next_seq("s:train:0", "alice") == 6
    assert registry.next_seq("s:train:0", "alice") == 7


def test_registry_must_live_on_the_brokers_server(url: str) -> None:
    same_server = Registry(Settings.from_env({"TINKERBELL_BROKER_URL": url, "TINKERBELL_REDIS_URL": url.rsplit("/", 1)[0] + "/5"}))
    assert same_server.broker_db == DB
    elsewhere = Registry(Settings.from_env({"TINKERBELL_BROKER_URL": url, "TINKERBELL_REDIS_URL": "redis://10.255.255.1:6379/0"}))
    with pytest.raises(ValueError, match="TINKERBELL_REDIS_URL"):
        _ = elsewhere.broker_db


def test_result_store_never_overwrites_a_success_and_publishes_what_it_stores(url: str) -> None:
    backend = ResultBackend(app=celery_app, url=url)
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


def _unacked(client: redis.Redis, tag: str) -> tuple[Any, Any]:
    return client.zscore("unacked_index", tag), client.hget("unacked", tag)


def test_worker_transport_records_unacked_before_the_task_and_plain_kombu_restores_it(url: str) -> None:
    """tasks.broker writes the unacked record without waiting for Redis's reply: the record must be in Redis when
    the message is handed over (a task then runs), be kombu's own record (kombu's plain transport restores it
    after a crash), and be gone after the ack."""
    from kombu import Connection

    client = redis.Redis.from_url(url)
    queue = adapter_queue("s:train:0")
    ours = Connection(url, transport="tasks.broker:Transport")
    plain = Connection(url, transport_options={"visibility_timeout": 0})
    assert type(celery_app.connection_for_write().transport).__module__ == "tasks.broker"  # what workers run on
    try:
        channel = ours.channel()
        assert channel.conn_or_acquire().__enter__() is channel.conn_or_acquire().__enter__()  # one client object
        for n in range(2):
            client.lpush(queue, task_message("tinkerbell.forward_backward", {"model_id": "s:train:0", "seq_id": n + 1, "data": []}, f"task-{n}", queue, "{}"))

        first = channel.basic_get(queue, no_ack=False)  # what a consumer gets right before running the task
        tag = first.delivery_tag
        score, record = _unacked(client, tag)
        assert score is not None and record is not None, "the unacked record is not in Redis when the task starts"
        raw, exchange, routing_key = json.loads(record)
        assert (exchange, routing_key) == ("", queue) and raw["headers"]["id"] == "task-0"
        first.ack()
        assert _unacked(client, tag) == (None, None)

        second = channel.basic_get(queue, no_ack=False)  # taken, then the worker "crashes": no ack
        assert second.headers["id"] == "task-1" and _unacked(client, second.delivery_tag)[1] is not None
        plain.default_channel.qos.restore_visible(num=10, interval=1)  # a plain kombu worker's periodic restore
        assert _unacked(client, second.delivery_tag) == (None, None)
        restored = plain.default_channel.basic_get(queue, no_ack=True)
        assert restored.headers["id"] == "task-1" and restored.body == second.body
    finally:
        ours.release()
        plain.release()
