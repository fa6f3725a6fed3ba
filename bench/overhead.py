"""What the service costs over running the same work in-process; prints a table.

(a) round-trip latency of a tiny forward_backward: HTTP → Redis → worker → result, vs the backend call in-process.
(b) SFT throughput (forward_backward + optim_step, batch 8×128) on SmolLM2: service vs a plain PEFT loop.
Both sides run with the same torch threads and the worker's allocator settings (tasks.worker.tune_malloc).
Usage: python bench/overhead.py [--latency-iters 200] [--sft-steps 5] [--threads 2] [--latency-threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from client import TinkerbellClient
from tests.stackutil import TINY_MODEL, RedisServer, Stack

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def batch(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(1, vocab, size=length + 1)
        out.append(
            {
                "model_input": tokens[:-1].tolist(),
                "loss_fn_inputs": {"target_tokens": tokens[1:].tolist(), "weights": [1.0] * length},
            }
        )
    return out


def in_process_backend(models_dir: Path, data_dir: Path):
    from backends.hf import HFTrainingBackend
    from core.settings import Settings

    return HFTrainingBackend(
        Settings.from_env({"TINKERBELL_MODELS_DIR": str(models_dir), "TINKERBELL_DATA_DIR": str(data_dir)})
    )


def to_request(model_id: str, data: list[dict]):
    from backends.base import Datum, FwdBwdRequest

    datums = [
        Datum(np.asarray(d["model_input"]), {k: np.asarray(v) for k, v in d["loss_fn_inputs"].items()}) for d in data
    ]
    return FwdBwdRequest(model_id, datums)


def bare_celery(stack: Stack):
    """A plain Celery client of the stack's broker: the round trip of a no-op task (Celery's built-in
    `celery.accumulate`) through the same worker is the floor that Celery and Redis alone set on this machine."""
    from celery import Celery

    from tasks.celery_app import worker_queue

    app = Celery("bare", broker=stack.redis.url(stack.db), backend=stack.redis.url(stack.db), set_as_current=False)
    app.conf.update(
        task_serializer="msgpack",
        result_serializer="msgpack",
        accept_content=["msgpack", "json"],
        result_accept_content=["msgpack", "json"],
    )
    return lambda: app.send_task("celery.accumulate", args=(0,), queue=worker_queue("bench0")).get(timeout=60)


def latency(stack: Stack, models_dir: Path, iters: int) -> tuple[list[float], list[float], list[float]]:
    """Milliseconds per tiny forward_backward, through the service and in this process, and per bare Celery
    round trip, in alternating blocks so drift in the machine's speed falls on all alike."""
    from backends.base import LoraSpec

    tb = TinkerbellClient(stack.url, api_key="tml-bench")
    model_id = tb.add_lora(base_model=TINY_MODEL, rank=4).result(300)["model_id"]
    data = batch(1, 8, 1000)
    backend = in_process_backend(models_dir, stack.data_dir)
    backend.create_adapter("bench", TINY_MODEL, LoraSpec(rank=4))
    bare_round_trip = bare_celery(stack)
    for _ in range(10):
        tb.forward_backward(model_id, data).result(60)
        backend.forward_backward([to_request("bench", data)])
        bare_round_trip()
    service: list[float] = []
    local: list[float] = []
    bare: list[float] = []
    block = 20
    while len(service) < iters:
        for _ in range(block):
            t0 = time.perf_counter()
            tb.forward_backward(model_id, data).result(60)
            service.append((time.perf_counter() - t0) * 1e3)
        for _ in range(block):
            t0 = time.perf_counter()
            backend.forward_backward([to_request("bench", data)])
            local.append((time.perf_counter() - t0) * 1e3)
        for _ in range(block // 2):
            t0 = time.perf_counter()
            bare_round_trip()
            bare.append((time.perf_counter() - t0) * 1e3)
    return service, local, bare


def latency_rows(label: str, service: list[float], local: list[float]) -> list[tuple[str, float, float, float]]:
    return [
        (
            f"(a) tiny forward_backward round trip{label}, p50 (ms)",
            statistics.median(local),
            statistics.median(service),
            statistics.median(service) - statistics.median(local),
        ),
        (
            f"(a) tiny forward_backward round trip{label}, p95 (ms)",
            pct(local, 95),
            pct(service, 95),
            pct(service, 95) - pct(local, 95),
        ),
    ]


def start_stack(models_dir: Path, threads: int, base_models: str) -> tuple[RedisServer, Stack]:
    redis = RedisServer()
    env = {
        "TINKERBELL_AUTH": "off",
        "OMP_NUM_THREADS": str(threads),
        "TINKERBELL_BASE_MODELS": base_models,
        "TINKERBELL_AUTOSAVE": os.environ.get("TINKERBELL_AUTOSAVE", "1"),
    }
    stack = Stack(redis, 0, models_dir, Path(tempfile.mkdtemp(prefix="tb-bench-data-")), extra_env=env)
    try:
        stack.start_worker("bench0")
        stack.start_api()
    except BaseException:
        stack.stop()
        redis.stop()
        raise
    return redis, stack


def sft_steps(stack: Stack, data: list[dict], steps: int) -> tuple[list[float], list[float]]:
    """Seconds per SFT step, in-process plain PEFT and through the service, alternating step by step so that
    drift in the machine's speed (other processes, thermal) falls on both alike."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from backends.models import resolve_model_dir
    from core.settings import Settings

    # A plain transformers + PEFT + AdamW loop in this process: no Tinkerbell code on its hot path.
    path = resolve_model_dir(SMOL, Settings.from_env(stack.env))
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
    )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0
    )
    tokens = torch.tensor([d["model_input"] for d in data])  # (B, T)
    targets = torch.tensor([d["loss_fn_inputs"]["target_tokens"] for d in data])  # (B, T)
    weights = torch.tensor([d["loss_fn_inputs"]["weights"] for d in data])  # (B, T)

    def plain_step() -> None:
        logprobs = torch.log_softmax(model(input_ids=tokens).logits.float(), -1).gather(-1, targets[..., None])[
            ..., 0
        ]  # (B, T)
        (-(logprobs * weights).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()

    tb = TinkerbellClient(stack.url, api_key="tml-bench")
    model_id = tb.add_lora(base_model=SMOL, rank=16, seed=0, train_unembed=False).result(600)[
        "model_id"
    ]  # same modules as all-linear

    def service_step() -> None:
        fb = tb.forward_backward(model_id, data)
        opt = tb.optim_step(model_id, learning_rate=1e-4)  # pipelined: queued behind fwd/bwd, as the SDK does
        fb.result(600), opt.result(600)

    plain_step(), service_step()  # warm-up
    plain, served = [], []
    for _ in range(steps):
        for step, times in ((plain_step, plain), (service_step, served)):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return plain, served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency-iters", type=int, default=200)
    parser.add_argument("--sft-steps", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads for (b), in the worker and in this process"
    )
    parser.add_argument(
        "--latency-threads", type=int, default=1, help="torch threads for (a): a tiny call runs fastest on one"
    )
    parser.add_argument("--skip-sft", action="store_true")
    args = parser.parse_args()
    import torch

    from tasks.worker import tune_malloc
    from tests.tiny_model import build_tiny_model

    tune_malloc()  # the allocator settings a worker runs with: the two sides differ only by the service
    models_dir = Path(tempfile.mkdtemp(prefix="tb-bench-models-"))
    build_tiny_model(models_dir / "tinkerbell" / "tiny-llama")
    rows = []
    torch.set_num_threads(args.latency_threads)
    redis, stack = start_stack(models_dir, args.latency_threads, TINY_MODEL)
    try:
        service, local, bare = latency(stack, models_dir, args.latency_iters)
        rows += latency_rows("", service, local)
    finally:
        stack.stop()
        redis.stop()
    if not args.skip_sft:
        torch.set_num_threads(args.threads)
        redis, stack = start_stack(models_dir, args.threads, SMOL)
        try:
            data = batch(8, 128, 49152, seed=1)
            plain, served = sft_steps(stack, data, args.sft_steps)
        finally:
            stack.stop()
            redis.stop()
        tokens = sum(len(d["model_input"]) for d in data)
        plain_tps, served_tps = tokens / statistics.median(plain), tokens / statistics.median(served)
        rows.append(("(b) SFT 8x128 SmolLM2, tokens/s (median step)", plain_tps, served_tps, served_tps / plain_tps))
    print()
    print("| measurement | in-process | through the service | service cost |")
    print("|---|---:|---:|---:|")
    for name, a, b, c in rows:
        cost = f"+{c:.2f} ms" if "ms" in name else f"{c:.3f}x"
        print(f"| {name} | {a:.2f} | {b:.2f} | {cost} |")
    print(
        "\nFor scale: a bare Celery+Redis round trip of a no-op task through the same worker, p50 "
        f"{statistics.median(bare):.2f} ms, p95 {pct(bare, 95):.2f} ms"
    )
    print(
        f"{os.cpu_count()} CPU cores; torch threads: (a) {args.latency_threads}, (b) {args.threads}; latency iters "
        f"{args.latency_iters}; SFT steps {args.sft_steps}"
    )


if __name__ == "__main__":
    main()
