"""Step time of a custom loss run on the server (SDK create_custom_loss: one forward_backward) against the same
traced loss run client-side (forward_backward_custom: a forward, the loss here, then a backward), on SmolLM2.

A step is forward_backward_custom + optim_step through the official tinker SDK; built-in cross_entropy is the floor.
Steps alternate between the ways so drift in the machine's speed falls on all alike. Prints a table.
Usage: python bench/custom_loss.py [--steps 5] [--datums 8] [--tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
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
os.environ["TINKER_TELEMETRY"] = "0"

import numpy as np

from bench.overhead import SMOL, start_stack
from bench.sampling import machine


def dpo(logprobs, ref_logprobs, chosen, rejected):
    """DPO on one datum holding a chosen and a rejected response (the masks say which tokens are which)."""
    import torch.nn.functional as F

    margin = ((logprobs - ref_logprobs) * chosen - (logprobs - ref_logprobs) * rejected).sum()
    return -F.logsigmoid(0.1 * margin), {"custom/margin:mean": margin.detach()}


def batch(datums: int, tokens: int, seed: int = 0) -> list:
    import tinker

    rng = np.random.default_rng(seed)
    out = []
    half = tokens // 2
    for _ in range(datums):
        ids = rng.integers(1, 49152, size=tokens + 1).tolist()
        chosen = np.r_[np.zeros(8), np.ones(half - 8), np.zeros(tokens - half)].astype(np.float32)
        rejected = np.r_[np.zeros(half + 8), np.ones(tokens - half - 8)].astype(np.float32)
        inputs = {
            "ref_logprobs": rng.normal(-8.0, 1.0, tokens).astype(np.float32),
            "chosen": chosen,
            "rejected": rejected,
        }
        out.append(
            tinker.Datum(
                model_input=tinker.ModelInput.from_ints(ids[:-1]),
                loss_fn_inputs={
                    "target_tokens": ids[1:],
                    **{k: tinker.TensorData.from_numpy(v) for k, v in inputs.items()},
                },
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--datums", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the worker")
    args = parser.parse_args()
    import tinker
    from tinker import types

    models_dir = Path(tempfile.mkdtemp(prefix="tb-bench-models-"))
    redis, stack = start_stack(models_dir, args.threads, SMOL)
    try:
        service = tinker.ServiceClient(base_url=stack.url, api_key="tml-bench")
        handle = service.create_custom_loss(dpo, {"logprobs": 1, "ref_logprobs": 1, "chosen": 1, "rejected": 1}).result(
            timeout=60
        )
        ways = {
            "built-in cross_entropy (floor)": lambda tc, data: tc.forward_backward(data, "cross_entropy"),
            "DPO server-side (create_custom_loss, 1 pass)": lambda tc, data: tc.forward_backward_custom(data, handle),
            "DPO client-side (forward_backward_custom, 2 passes)": lambda tc, data: tc.forward_backward_custom(
                data, dataclasses.replace(handle, loss_id=None)
            ),
        }
        clients = {name: service.create_lora_training_client(SMOL, rank=8, seed=0).result(timeout=300) for name in ways}
        data = batch(args.datums, args.tokens)
        adam = types.AdamParams(learning_rate=1e-4)
        times: dict[str, list[float]] = {name: [] for name in ways}
        names = list(ways)
        for step in range(args.steps + 1):  # step 0 warms every path up and is not counted
            for name in names[step % 3 :] + names[: step % 3]:  # who goes first rotates
                run = ways[name]
                start = time.perf_counter()
                fwdbwd = run(clients[name], data)
                optim = clients[name].optim_step(adam)
                fwdbwd.result(timeout=600)
                optim.result(timeout=600)
                if step:
                    times[name].append(time.perf_counter() - start)
        service.close("success").result(timeout=30)
    finally:
        stack.stop()
        redis.stop()
    tokens = args.datums * args.tokens
    floor = statistics.median(times["built-in cross_entropy (floor)"])
    client_side = statistics.median(times["DPO client-side (forward_backward_custom, 2 passes)"])
    print(f"\nCustom loss step, SmolLM2-135M, {args.datums}x{args.tokens} tokens + AdamW, {args.steps} steps each:")
    print(
        "| way | median s/step | fastest s/step | tokens/s (median) | vs built-in | vs client-side | every step (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"| {name} | {median:.2f} | {min(values):.2f} | {tokens / median:.0f} | {median / floor:.2f}x "
            f"| {median / client_side:.2f}x | {' '.join(f'{v:.1f}' for v in values)} |"
        )
    print(f"\n{machine()}; worker torch threads {args.threads}; load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
