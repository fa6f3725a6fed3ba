"""What the tenant bookkeeping costs; prints a table.

Side by side in one run, against a redis-server this script starts on a free port (never 6379):
(a) one /status.json refresh as it is now (live workers' queues by name, the pending count as listed) against the
    way it was (a SCAN of the whole keyspace for queue lists, and one EXISTS per pending future), with 64 adapters on
    one worker, 5000 pending futures and --keys other keys in Redis (checkpoints, results, sessions of many users);
(b) admitting a request (the registry's submit script) with the per-key queued-requests limit off and on, plus the
    worker's finish_request that counts it out when the limit is on.
Usage: python bench/tenants.py [--keys 200000] [--requests 2000]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(fn, repeat: int) -> float:
    """Median seconds of fn() over repeat calls."""
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    import redis

    from api import create_app
    from api.ops import snapshot
    from core.registry import PENDING_FUTURES, Registry
    from core.settings import Settings
    from scripts.stack import find_redis_server
    from tests.stackutil import free_port, wait_for

    port = free_port()
    workdir = tempfile.mkdtemp(prefix="tb-bench-redis-")
    server = subprocess.Popen(
        [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        wait_for(lambda: _pings(client), 10, "redis-server")
        settings = Settings(broker_url=f"redis://127.0.0.1:{port}/0", data_dir=workdir)
        registry = Registry(settings)
        adapters = [f"s{i}:train:0" for i in range(64)]
        registry.register_worker("w0", {"device": "cpu", "base_models": ["m"]}, ttl_s=3600)
        registry.redis.sadd("tb:worker:w0:adapters", *adapters)
        with registry.redis.pipeline(transaction=False) as pipe:
            for i in range(args.keys):
                pipe.set(f"tb:other:{i}", "x")
                if i % 10_000 == 9999:
                    pipe.execute()
            pipe.zadd(PENDING_FUTURES, {f"pending-{i}": time.time() for i in range(5000)})
            pipe.execute()
        app = create_app(settings, registry)
        now = timed(lambda: snapshot(app, cheap=True), 20)
        before = timed(lambda: snapshot(app, cheap=False), 5)

        def admit(limit: int) -> tuple[float, float]:
            limited = Registry(replace(settings, max_queued_requests_per_key=limit))
            model_id = f"bench-{limit}:train:0"
            limited.redis.hset(f"tb:model:{model_id}", "owner", '"k"')
            submits, finishes = [], []
            for seq in range(1, args.requests + 1):
                request_id = f"{limit}-{seq}"
                t0 = time.perf_counter()
                limited.submit(model_id, seq, request_id, "m", f"adapter.{model_id}", "k", "forward_backward")
                t1 = time.perf_counter()
                if limit:
                    limited.finish_request(request_id)
                submits.append(t1 - t0)
                finishes.append(time.perf_counter() - t1)
            return statistics.median(submits), statistics.median(finishes)

        off, _ = admit(0)
        on, finish = admit(1_000_000)
    finally:
        server.terminate()
        server.wait(10)
    print("| measurement | before / limit off | now / limit on | ratio |")
    print("|---|---:|---:|---:|")
    print(
        f"| (a) /status.json snapshot, {args.keys} other keys (ms) | {before * 1e3:.1f} | {now * 1e3:.2f} | "
        f"{before / now:.0f}x cheaper |"
    )
    print(f"| (b) admit one request, submit script (us) | {off * 1e6:.0f} | {on * 1e6:.0f} | {on / off:.2f}x |")
    print(f"| (b) count it out after its result, finish_request (us) | - | {finish * 1e6:.0f} | |")
    print(
        f"\n{platform.machine()}, {os.cpu_count()} CPU cores; medians; Redis on "
        "loopback; the machine's other load not controlled"
    )


def _pings(client) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


if __name__ == "__main__":
    main()
