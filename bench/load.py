"""Load: N concurrent official-SDK clients, each training its own adapter for S steps against W workers; prints
throughput and p50/p99 request latency, and checks that every adapter ends equal to training it alone.

Side by side in one run, against what a user would do instead: the same N adapters trained one after another in
this process with plain transformers + PEFT + torch AdamW, which is also the reference each served adapter must equal
(every LoRA weight within 1e-5). On the tiny test model, so the table shows what the service itself costs and holds
under many clients. tests/test_load.py runs a small version of the same workload.
Usage: python bench/load.py [--clients 32] [--steps 20] [--workers 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["TINKER_TELEMETRY"] = "0"

import numpy as np

from tests.stackutil import TINY_MODEL, RedisServer, Stack

KEY = "tml-load"
RANKS = (2, 4, 8, 16)
# Adam divides each gradient by its own size, so float noise on a small gradient (the service's packed pass and the
# plain loop sum in other orders, ~1e-8 here) moves a weight by about lr * noise / eps: with lr 1e-2 the served
# adapters differed from the plain loop by up to 3.6e-5 after 4 steps; with lr 1e-3 and eps 1e-5 by at most 5e-7,
# but over 20 steps one adapter of 32 drifted to 1.68e-5. lr 1e-4 is the SDK's own default (AdamParams).
ADAM = {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-5, "weight_decay": 0.0, "grad_clip_norm": 0.0}
TOLERANCE = 1e-5
CHECKPOINT = "load-final"


@dataclass(frozen=True)
class Plan:
    """Client i's adapter and batch: ranks, seeds, datum lengths and weights differ between clients."""

    rank: int
    seed: int
    batch: list[tuple[list[int], list[int], list[float]]]  # per datum: tokens, target_tokens, weights

    @property
    def tokens(self) -> int:
        return sum(len(tokens) for tokens, _, _ in self.batch)


def plan(i: int) -> Plan:
    rng = np.random.default_rng(i)
    batch = []
    for j in range(2):
        length = 8 + 4 * ((i + j) % 5)
        tokens = rng.integers(1, 300, size=length + 1).tolist()
        weights = rng.random(length).astype(np.float32).tolist()
        batch.append((tokens[:-1], tokens[1:], weights))
    return Plan(RANKS[i % len(RANKS)], 1000 + i, batch)


@dataclass
class Outcome:
    """What one client saw: its adapter, each request's latency (submit to result, seconds), or its error."""

    model_id: str | None = None
    latencies_s: list[float] = field(default_factory=list)
    error: str | None = None
    holders: list[str] = field(default_factory=list)  # the workers holding its adapter at the end, before close


def train_through_sdk(
    url: str, p: Plan, steps: int, start: threading.Barrier, holders: Callable[[str], list[str]]
) -> Outcome:
    """One user: its own ServiceClient (its own session) trains its adapter `steps` SFT steps, optim_step pipelined
    behind forward_backward as SDK users write it, then saves the state as CHECKPOINT."""
    import tinker

    outcome = Outcome()
    service = tinker.ServiceClient(base_url=url, api_key=KEY)
    try:
        training = service.create_lora_training_client(TINY_MODEL, rank=p.rank, seed=p.seed).result(timeout=600)
        outcome.model_id = training.model_id
        batch = [
            tinker.Datum(
                model_input=tinker.ModelInput.from_ints(tokens),
                loss_fn_inputs={"target_tokens": targets, "weights": weights},
            )
            for tokens, targets, weights in p.batch
        ]
        adam = tinker.types.AdamParams(**ADAM)
        start.wait(timeout=600)
        for _ in range(steps):
            t0 = time.perf_counter()
            fwdbwd = training.forward_backward(batch, "cross_entropy")
            t1 = time.perf_counter()
            step = training.optim_step(adam)
            fwdbwd.result(timeout=600)
            outcome.latencies_s.append(time.perf_counter() - t0)
            step.result(timeout=600)
            outcome.latencies_s.append(time.perf_counter() - t1)
        training.save_state(CHECKPOINT).result(timeout=600)
        outcome.holders = holders(training.model_id)  # close parks the session's adapters, so look before it
    except Exception as exc:  # noqa: BLE001 - a load test reports every client's failure, not the first one only
        outcome.error = f"{type(exc).__name__}: {exc}"
        start.abort()
    finally:
        service.close("success").result(timeout=60)
    return outcome


def run_clients(stack: Stack, clients: int, steps: int) -> tuple[list[Outcome], float]:
    """`clients` SDK clients at once; returns their outcomes and the seconds from the common start to the last
    result (adapter creation, before the start, is not timed)."""
    start = threading.Barrier(clients + 1)
    registry = stack.registry()

    def holders(model_id: str) -> list[str]:
        return [w["name"] for w in registry.live_workers() if model_id in w["adapters"]]

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(train_through_sdk, stack.url, plan(i), steps, start, holders) for i in range(clients)]
        try:
            start.wait(timeout=600)
        except threading.BrokenBarrierError:
            pass  # a client failed before the start; its outcome says why
        t0 = time.perf_counter()
        outcomes = [f.result() for f in futures]
    return outcomes, time.perf_counter() - t0


def served_weights(stack: Stack, model_id: str) -> dict[str, Any]:
    """The adapter's LoRA weights as the service saved them (PEFT's file and key names)."""
    from safetensors.torch import load_file

    record = stack.registry().checkpoint(model_id, f"weights/{CHECKPOINT}")
    return load_file(str(Path(record["dir"]) / "adapter_model.safetensors"))


def train_alone(models_dir: Path, p: Plan, steps: int, step_times_s: list[float] | None = None) -> dict[str, Any]:
    """The same adapter trained alone, in this process, by plain transformers + PEFT + torch AdamW; its LoRA weights.
    LoRA is initialised as the service does it for a seed: torch.manual_seed(seed), then get_peft_model."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from backends.hf import lora_targets

    base = AutoModelForCausalLM.from_pretrained(str(models_dir / TINY_MODEL), dtype=torch.float32).eval()
    config = LoraConfig(
        r=p.rank, lora_alpha=32, target_modules=lora_targets(True, True, True), lora_dropout=0.0
    )  # the SDK's defaults: attention, MLP and unembedding; alpha 32
    torch.manual_seed(p.seed)
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW(
        [q for q in model.parameters() if q.requires_grad],
        lr=ADAM["learning_rate"],
        betas=(ADAM["beta1"], ADAM["beta2"]),
        eps=ADAM["eps"],
        weight_decay=ADAM["weight_decay"],
    )
    batch = [(torch.tensor([t]), torch.tensor(y), torch.tensor(w)) for t, y, w in p.batch]  # (1, T), (T,), (T,)
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = torch.zeros(())
        for tokens, targets, weights in batch:
            logprobs = torch.log_softmax(model(input_ids=tokens).logits[0], -1)  # (T, V)
            loss = loss - (logprobs.gather(-1, targets[:, None])[:, 0] * weights).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step_times_s is not None:
            step_times_s.append(time.perf_counter() - t0)
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach().clone() for k, v in state.items()}


def max_difference(served: dict[str, Any], alone: dict[str, Any]) -> float:
    """Largest |served - alone| over every LoRA weight; inf when the two do not hold the same tensors."""
    if set(served) != set(alone):
        return float("inf")
    return max(float((served[k] - alone[k]).abs().max()) for k in alone)


def start_stack(models_dir: Path, workers: int) -> tuple[RedisServer, Stack]:
    redis = RedisServer()
    stack = Stack(
        redis, 0, models_dir, Path(tempfile.mkdtemp(prefix="tb-load-data-")), extra_env={"TINKERBELL_AUTH": "off"}
    )
    try:
        for i in range(workers):
            stack.start_worker(f"load{i}")
        stack.start_api(workers=2)  # as api/gunicorn_conf.py runs it: 2 processes x 64 threads for the long-polls
    except BaseException:
        stack.stop()
        redis.stop()
        raise
    return redis, stack


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the in-process side")
    args = parser.parse_args()
    import torch

    from tests.tiny_model import build_tiny_model

    load_before = os.getloadavg()
    models_dir = Path(tempfile.mkdtemp(prefix="tb-load-models-"))
    build_tiny_model(models_dir / TINY_MODEL)
    redis, stack = start_stack(models_dir, args.workers)
    try:
        outcomes, served_s = run_clients(stack, args.clients, args.steps)
        differences = [
            max_difference(served_weights(stack, o.model_id), train_alone(models_dir, plan(i), args.steps))
            if o.error is None
            else float("nan")
            for i, o in enumerate(outcomes)
        ]
        spread = dict(Counter(name for o in outcomes for name in o.holders))
    finally:
        stack.stop()
        redis.stop()
    torch.set_num_threads(args.threads)
    step_times: list[float] = []
    t0 = time.perf_counter()
    for i in range(args.clients):
        train_alone(models_dir, plan(i), args.steps, step_times)
    alone_s = time.perf_counter() - t0
    load_after = os.getloadavg()

    errors = [o.error for o in outcomes if o.error]
    latencies_ms = [s * 1e3 for o in outcomes for s in o.latencies_s]
    steps = args.clients * args.steps
    tokens = sum(plan(i).tokens for i in range(args.clients)) * args.steps
    equal = sum(d <= TOLERANCE for d in differences)
    rows = [
        ("adapter steps/s", steps / alone_s, steps / served_s),
        ("tokens/s", tokens / alone_s, tokens / served_s),
        ("p50 ms: in-process step / service request (submit to result)", pct(step_times, 50), pct(latencies_ms, 50)),
        ("p99 ms: in-process step / service request (submit to result)", pct(step_times, 99), pct(latencies_ms, 99)),
    ]
    print()
    print(
        f"| {args.clients} adapters x {args.steps} steps, tiny model | in-process, one adapter after another | "
        f"through the service, {args.clients} concurrent SDK clients, {args.workers} workers | ratio |"
    )
    print("|---|---:|---:|---:|")
    for name, alone, served in rows:
        if name.startswith("p"):
            alone *= 1e3  # step_times are seconds
        print(f"| {name} | {alone:.1f} | {served:.1f} | {served / alone:.2f}x |")
    print(f"| clients that failed | — | {len(errors)} of {args.clients} | |")
    worst = max((d for d in differences if not math.isnan(d)), default=float("nan"))
    print(
        f"| adapters equal to training alone (max abs weight difference <= {TOLERANCE:g}) | — | {equal} of "
        f"{args.clients} (largest {worst:.2e}) | |"
    )
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after; in-process torch threads {args.threads}, workers 1 "
        f"each; requests {len(latencies_ms)}; adapters per worker {spread}"
    )
    for error in errors[:5]:
        print("error:", error)


if __name__ == "__main__":
    main()
