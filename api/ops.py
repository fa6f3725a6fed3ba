"""Operations face: `GET /metrics` (Prometheus), `GET /` (a self-refreshing status page) and `GET /status.json`.

Request counts and latencies are prometheus_client metrics, summed over gunicorn's processes by its multiprocess
mode (api/gunicorn_conf.py sets PROMETHEUS_MULTIPROC_DIR); everything else is read from Redis at scrape time, so
any API process reports the same totals.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.auth import public
from core.registry import PENDING_FUTURES, P, Registry
from core.settings import Settings

log = logging.getLogger("tinkerbell.api.ops")

bp = Blueprint("ops", __name__)

RECENT_KEY = P + "ops:recent"  # list of recent requests, newest first (no bodies, no keys)
RECENT_MAX = 50
# Seconds. retrieve_future long-polls for up to TINKERBELL_POLL_TIMEOUT_S, hence the long tail.
BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))
QUEUE_PREFIXES = ("adapter.", "worker.", "sample.")
DEFAULT_QUEUE = "tinkerbell.default"
PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport names priority variants <queue>\x06\x16<n>: not queues of their own
# Requests that would drown the "recent requests" list (the status page polls every 2 s; health checks).
QUIET_ENDPOINTS = {"ops.status_page", "ops.status_json", "ops.metrics", "ops.favicon", "native.healthz"}
STATUS_HTML = Path(__file__).with_name("templates") / "status.html"


# ---- request accounting -------------------------------------------------------------------------

# Not in prometheus_client's default registry: each app's /metrics registry holds them, or in gunicorn the
# multiprocess collector that reads every process's values.
HTTP_REQUESTS = Counter(
    "tinkerbell_http_requests",
    "HTTP requests answered, by method, route and status.",
    ["method", "route", "status"],
    registry=None,
)
HTTP_LATENCY = Histogram(
    "tinkerbell_http_request_duration_seconds",
    "Time from request to response (long-polls included), by method and route.",
    ["method", "route"],
    buckets=BUCKETS,
    registry=None,
)


def route_label() -> str:
    """The URL rule, never the raw path: bounded label values and no ids from the path."""
    return request.url_rule.rule if request.url_rule is not None else "<unmatched>"


@bp.after_app_request
def record_request(response: Response) -> Response:
    """Count the request by route and status and add its latency to the histogram; list it among the recent
    requests once the response has been sent."""
    started = g.get("started")
    if started is None:
        return response
    seconds = max(0.0, time.perf_counter() - started)
    method, route, status = request.method, route_label(), response.status_code
    HTTP_REQUESTS.labels(method, route, str(status)).inc()
    HTTP_LATENCY.labels(method, route).observe(seconds)
    if request.endpoint not in QUIET_ENDPOINTS:
        ms = round(seconds * 1000, 1)
        entry = {"time": time.time(), "method": method, "route": route, "status": status, "ms": ms}
        response.call_on_close(functools.partial(remember_request, current_app.config["REGISTRY"].redis, entry))
    return response


def remember_request(client: redis.Redis, entry: dict[str, Any]) -> None:
    """Add a request to the status page's recent list in Redis (shared by every API process). Never fails."""
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.lpush(RECENT_KEY, json.dumps(entry, separators=(",", ":")))
            pipe.ltrim(RECENT_KEY, 0, RECENT_MAX - 1)
            pipe.execute()
    except redis.RedisError:
        log.warning("could not record a recent request", exc_info=True)


# ---- reading the state ----------------------------------------------------------------------------


def broker_client(app: Flask) -> redis.Redis:
    """One client per process for the broker's Redis (queues live there, maybe not in the registry's db)."""
    clients = app.extensions.setdefault("tinkerbell_ops", {})
    if "broker" not in clients:
        settings: Settings = app.config["SETTINGS"]
        registry: Registry = app.config["REGISTRY"]
        clients["broker"] = (
            registry.redis
            if settings.broker_url == settings.registry_url
            else redis.Redis.from_url(settings.broker_url, decode_responses=True)
        )
    return clients["broker"]


def queue_kind(name: str) -> str:
    return name.split(".", 1)[0] if name.startswith(QUEUE_PREFIXES) else "default"


def queue_depths(broker: redis.Redis, workers: list[dict[str, Any]], scan: bool = True) -> dict[str, int]:
    """Messages waiting in each Tinkerbell queue: the live workers' queues (0 when empty) and, with scan, every other
    queue list the broker holds (a dead worker's, say): a SCAN of the whole keyspace, for /metrics only."""
    names = {DEFAULT_QUEUE}
    for worker in workers:
        names.add(f"worker.{worker['name']}")
        names.update(f"adapter.{model_id}" for model_id in worker.get("adapters", []))
        names.update(f"sample.{base_model}" for base_model in worker.get("base_models", []))
    for key in broker.scan_iter(match="[aws]*.*", count=1000) if scan else ():  # adapter.*, worker.*, sample.*
        name = key.decode() if isinstance(key, bytes) else key
        if name.startswith(QUEUE_PREFIXES) and PRIORITY_SEP not in name:
            names.add(name)
    ordered = sorted(names)
    pipe = broker.pipeline(transaction=False)
    for name in ordered:
        pipe.llen(name)
    depths = pipe.execute(raise_on_error=False)
    return {
        name: int(depth) for name, depth in zip(ordered, depths) if isinstance(depth, int)
    }  # a non-list key is no queue


def pending_futures(registry: Registry, backend: Any) -> int:
    """Futures accepted but without a result yet; the finished ones are pruned from the set as they are seen.
    backend: the Celery app's result backend."""
    client = registry.redis
    client.zremrangebyscore(PENDING_FUTURES, "-inf", time.time() - 7 * 86400)  # results expire after 7 days
    ids = client.zrange(PENDING_FUTURES, 0, -1)
    if not ids:
        return 0
    pipe = backend.client.pipeline(transaction=False)
    for request_id in ids:
        pipe.exists(backend.get_key_for_task(request_id))
    done = [request_id for request_id, exists in zip(ids, pipe.execute()) if exists]
    if done:
        client.zrem(PENDING_FUTURES, *done)
    return len(ids) - len(done)


def snapshot(app: Flask, cheap: bool = False) -> dict[str, Any]:
    """Everything the status page and /metrics report, read from Redis once.

    cheap (the status page, refreshed every 2 s by every open browser): no keyspace scan, so only live workers'
    queues, and the pending futures counted as listed (workers take each one off when its result is stored)
    instead of checked one by one against the result backend."""
    registry: Registry = app.config["REGISTRY"]
    workers = registry.live_workers()
    return {
        "workers": workers,
        "queues": queue_depths(broker_client(app), workers, scan=not cheap),
        "futures_pending": (
            int(registry.redis.zcard(PENDING_FUTURES))
            if cheap
            else pending_futures(registry, app.config["SERVICE"].results)
        ),
        "stats": registry.stats(),
        "adapters_parked": registry.parked_count(),
    }


def worker_device(worker: dict[str, Any]) -> str:
    """The physical device (cuda:3), not the pinned one every GPU worker sees as cuda:0."""
    return str(worker.get("physical_device") or worker.get("device") or "?")


# ---- /metrics -------------------------------------------------------------------------------------


class RedisCollector(Collector):
    """Builds the state's metric families (queues, futures, workers, token counters) from one snapshot of Redis at
    scrape time."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("tinkerbell_redis_up", "1 when the API could read Redis for this scrape.")
        try:
            if not self.app.config["REGISTRY"].reachable():
                raise redis.ConnectionError("Redis does not answer a PING")
            snap = snapshot(self.app)
        except redis.RedisError:
            log.warning("metrics scrape could not read Redis", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from self._state(snap)

    def _state(self, snap: dict[str, Any]) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "tinkerbell_queue_depth",
            "Messages waiting in each broker queue (adapter.<model_id>, worker.<name>, sample.<base_model>).",
            labels=["queue", "kind"],
        )
        for name, count in snap["queues"].items():
            depth.add_metric([name, queue_kind(name)], count)
        yield depth

        yield GaugeMetricFamily(
            "tinkerbell_futures_pending",
            "Requests accepted whose result is not ready yet.",
            value=snap["futures_pending"],
        )
        yield GaugeMetricFamily(
            "tinkerbell_workers_alive", "Workers with a fresh heartbeat.", value=len(snap["workers"])
        )
        adapters = GaugeMetricFamily(
            "tinkerbell_worker_adapters", "Adapters owned by each live worker.", labels=["worker", "device"]
        )
        memory = GaugeMetricFamily(
            "tinkerbell_worker_memory_bytes",
            "Memory the worker's training backend reports in use.",
            labels=["worker", "device"],
        )
        for worker in snap["workers"]:
            labels = [worker["name"], worker_device(worker)]
            adapters.add_metric(labels, len(worker.get("adapters", [])))
            memory.add_metric(labels, float(worker.get("memory_bytes") or 0))
        yield adapters
        yield memory
        yield GaugeMetricFamily(
            "tinkerbell_adapters_parked",
            "Adapters no worker holds (idle session, finished session or dead worker): saved, memory freed.",
            value=snap["adapters_parked"],
        )

        stats = {"tokens_trained": 0.0, "tokens_sampled": 0.0, **snap["stats"]}
        help_text = {
            "tokens_trained": "Tokens in forward_backward batches that trained.",
            "tokens_sampled": "Tokens generated by sampling.",
            "tokens_forward": "Tokens in forward-only batches.",
        }
        for name, value in sorted(stats.items()):
            if name.replace("_", "").isalnum():
                yield CounterMetricFamily(
                    f"tinkerbell_{name}", help_text.get(name, f"Counter {name} from the registry."), value=value
                )


@bp.record_once
def _make_registry(state: Any) -> None:
    """Private CollectorRegistries per app (nothing from the process-global default registry leaks in): the HTTP
    metrics, from every gunicorn process when there is a multiprocess directory, and those plus the Redis state."""
    settings: Settings = state.app.config["SETTINGS"]
    http = CollectorRegistry(auto_describe=False)
    if settings.metrics_dir:
        multiprocess.MultiProcessCollector(http, path=settings.metrics_dir)
    else:  # one process (python -m api, tests' create_app): this process's values are all there are
        http.register(HTTP_REQUESTS)
        http.register(HTTP_LATENCY)
    everything = CollectorRegistry(auto_describe=False)
    everything.register(http)
    everything.register(RedisCollector(state.app))
    state.app.extensions["tinkerbell_metrics"] = {"http": http, "all": everything}


def requests_answered(app: Flask) -> int:
    """HTTP requests answered so far, over every API process."""
    families = app.extensions["tinkerbell_metrics"]["http"].collect()
    return int(sum(s.value for f in families for s in f.samples if s.name == "tinkerbell_http_requests_total"))


@bp.get("/metrics")
@public
def metrics() -> Response:
    body = generate_latest(current_app.extensions["tinkerbell_metrics"]["all"])
    return Response(
        body, content_type="text/plain; version=0.0.4; charset=utf-8", headers={"Cache-Control": "no-store"}
    )


# ---- status page ------------------------------------------------------------------------------------


def status_document(app: Flask) -> dict[str, Any]:
    """What anyone may see without a key: workers, devices, adapter counts (live on workers, and parked), queue depths,
    recent requests.

    Adapter queues are summed per worker and model ids are left out: they are other keys' business.
    """
    snap = snapshot(app, cheap=True)
    queues = snap["queues"]
    workers = []
    for worker in snap["workers"]:
        owned = worker.get("adapters", [])
        workers.append(
            {
                "name": worker["name"],
                "device": worker_device(worker),
                "host": worker.get("host", ""),
                "adapters": len(owned),
                "waiting": queues.get(f"worker.{worker['name']}", 0)
                + sum(queues.get(f"adapter.{m}", 0) for m in owned),
                "base_models": worker.get("base_models", []),
                "loaded_models": worker.get("loaded_models", []),  # and their weights' bytes, against the limit
                "model_bytes": worker.get("model_bytes", {}),
                "model_memory_limit_bytes": worker.get("model_memory_limit_bytes", 0),
                "memory_bytes": worker.get("memory_bytes") or 0,
                "heartbeat_age_s": round(max(0.0, time.time() - float(worker.get("heartbeat") or time.time())), 1),
                "running": _running(worker.get("current_task")),
            }
        )
    adapter_queues = [depth for name, depth in queues.items() if name.startswith("adapter.")]
    shown = [{"queue": name, "depth": depth} for name, depth in queues.items() if not name.startswith("adapter.")]
    shown.append({"queue": f"adapter.* ({len(adapter_queues)} queues)", "depth": sum(adapter_queues)})
    registry: Registry = app.config["REGISTRY"]
    recent = [json.loads(raw) for raw in registry.redis.lrange(RECENT_KEY, 0, 19)]
    stats = snap["stats"]
    return {
        "time": time.time(),
        "totals": {
            "workers_alive": len(workers),
            "adapters": sum(w["adapters"] for w in workers),
            "adapters_parked": snap["adapters_parked"],
            "futures_pending": snap["futures_pending"],
            "requests": requests_answered(app),
            "tokens_trained": int(stats.get("tokens_trained", 0)),
            "tokens_sampled": int(stats.get("tokens_sampled", 0)),
        },
        "workers": workers,
        "queues": shown,
        "recent_requests": recent,
    }


def _running(current: dict[str, Any] | None) -> str:
    """The task a worker ran at its last heartbeat, by name and age only (no model ids on the public page)."""
    if not current:
        return "idle"
    return (
        f"{current['task'].removeprefix('tinkerbell.')} for {max(0.0, time.time() - float(current['started'])):.1f} s"
    )


@bp.get("/status.json")
@public
def status_json() -> Response:
    response = jsonify(status_document(current_app._get_current_object()))
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/")
@public
def status_page() -> Response:
    return Response(
        STATUS_HTML.read_text(encoding="utf-8"), mimetype="text/html", headers={"Cache-Control": "no-store"}
    )


@bp.get("/favicon.ico")
@public
def favicon() -> Response:
    """Browsers ask for it on every page load; an empty answer keeps 404s out of the metrics."""
    return Response(status=204, headers={"Cache-Control": "max-age=86400"})
