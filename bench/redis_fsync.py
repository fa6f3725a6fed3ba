"""What Redis's append-only fsync policy costs a training loop; prints a table, one row per policy, in one run.

Each policy gets its own redis-server (append-only file on) and the same stack on it: one CPU worker on the tiny test
model, the API (gunicorn), the official tinker SDK as client running forward_backward + optim_step steps, as a user's
loop does. Every step writes the registry, the broker queues and the results, so this is Redis's fsync on the
request path. appendfsync "no" is what a user gets with the AOF on but fsync left to the OS.
Usage: python bench/redis_fsync.py [--steps 30] [--policies always,everysec,no]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")


def run_policy(policy: str, steps: int, models_dir: Path) -> list[float]:
    import tinker
    from tinker import types

    from tests.stackutil import TINY_MODEL, RedisServer, Stack
    from tests.test_redis_restart import make_datum

    redis_server = RedisServer(appendfsync=policy)
    stack = Stack(
        redis_server, 0, models_dir, Path(tempfile.mkdtemp(prefix="tb-fsync-")), extra_env={"TINKERBELL_AUTH": "off"}
    )
    try:
        stack.start_worker("w0")
        stack.start_api()
        service = tinker.ServiceClient(base_url=stack.url, api_key="tml-bench")
        client = service.create_lora_training_client(TINY_MODEL, rank=8, seed=0).result(timeout=120)
        batch = [make_datum(s) for s in range(4)]
        times = []
        for _ in range(steps + 2):  # the first two warm up
            start = time.perf_counter()
            fwdbwd = client.forward_backward(batch, "cross_entropy")
            optim = client.optim_step(types.AdamParams(learning_rate=1e-3))
            fwdbwd.result(timeout=120)
            optim.result(timeout=120)
            times.append(time.perf_counter() - start)
        return times[2:]
    finally:
        stack.stop()
        redis_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--policies", default="always,everysec,no")
    args = parser.parse_args()
    from tests.tiny_model import build_tiny_model

    models_dir = Path(tempfile.mkdtemp(prefix="tb-models-")) / "models"
    build_tiny_model(models_dir / "tinkerbell" / "tiny-llama")
    rows = [(policy, run_policy(policy, args.steps, models_dir)) for policy in args.policies.split(",")]
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs; {args.steps} SDK steps each")
    print(f"{'appendfsync':<12} {'step p50 ms':>12} {'step p90 ms':>12} {'steps/s':>8}")
    for policy, times in rows:
        p90 = sorted(times)[int(0.9 * (len(times) - 1))]
        print(
            f"{policy:<12} {statistics.median(times) * 1e3:>12.1f} {p90 * 1e3:>12.1f} {len(times) / sum(times):>8.2f}"
        )


if __name__ == "__main__":
    main()
