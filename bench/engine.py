"""What the worker engine buys: many adapters in one pass, packed rows, many samples in one loop; prints a table.

Side by side in one run on SmolLM2, against what a user would do instead in one process:
(a) N adapters x 1 datum x 128 tokens per step, N concurrent official-SDK clients, vs a plain PEFT loop that
    round-robins the same N adapters (N = 1, 4, 8, 16);
(b) one adapter, 8 datums of 16..512 tokens per step, vs plain PEFT with the batch right-padded;
(c) 64 prompts x 128 new tokens over 8 adapters, 64 concurrent calls, vs the same calls one after another through
    the service, and vs in-process HF `generate` with batch 64 and one adapter.
Each for float32 and bfloat16 base weights (TINKERBELL_DTYPE). Usage: python bench/engine.py [--steps 2] [--dtypes
float32,bfloat16]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["TINKER_TELEMETRY"] = "0"

import numpy as np

from bench.overhead import SMOL, start_stack
from client import TinkerbellClient
from tests.stackutil import Stack, engine_stats_after

VOCAB = 49152
RANK = 16


def datum(rng: np.random.Generator, length: int):
    import tinker

    tokens = rng.integers(1, VOCAB, size=length + 1)
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1].tolist()),
        loss_fn_inputs={"target_tokens": tokens[1:].tolist(), "weights": [1.0] * length},
    )


def plain_peft(stack: Stack, adapters: int, dtype: str):
    """A plain transformers + PEFT model with `adapters` LoRA adapters and one AdamW each: what a user would write."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from backends.models import resolve_model_dir
    from core.settings import Settings

    path = resolve_model_dir(SMOL, Settings.from_env(stack.env))
    base = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    config = LoraConfig(r=RANK, lora_alpha=32, target_modules="all-linear")
    model = get_peft_model(base, config, adapter_name="a0")
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", config)
    optimizers = {}
    for i in range(adapters):
        params = [p for n, p in model.named_parameters() if f".a{i}." in n]
        for p in params:
            p.data = p.data.float()  # LoRA weights in fp32, as the service keeps them
        optimizers[f"a{i}"] = torch.optim.AdamW(params, lr=1e-4)
    return model, optimizers


def plain_step(model, optimizer, name: str, batch: list) -> None:
    import torch

    model.set_adapter(name)
    lengths = [len(d.model_input.to_ints()) for d in batch]
    width = max(lengths)
    ids = torch.zeros((len(batch), width), dtype=torch.int64)  # (B, L) right-padded
    mask = torch.zeros_like(ids)
    targets = torch.zeros_like(ids)
    for i, d in enumerate(batch):
        ids[i, : lengths[i]] = torch.tensor(d.model_input.to_ints())
        targets[i, : lengths[i]] = torch.tensor(d.loss_fn_inputs["target_tokens"].tolist())
        mask[i, : lengths[i]] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=next(model.parameters()).dtype == torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, L, V)
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]  # (B, L)
    (-(logprobs * mask).sum()).backward()
    optimizer.step()
    optimizer.zero_grad()


def training(stack: Stack, batches: list[list], steps: int, dtype: str) -> tuple[float, float]:
    """Tokens/s of SFT steps of len(batches) adapters: a plain PEFT loop round-robining them in this process, and
    one concurrent SDK client per adapter through the service; rounds alternate so the machine's drift hits both."""
    import tinker

    model, optimizers = plain_peft(stack, len(batches), dtype)
    service = tinker.ServiceClient(base_url=stack.url, api_key="tml-bench")
    adam = tinker.types.AdamParams(learning_rate=1e-4)
    with ThreadPoolExecutor(len(batches)) as pool:
        clients = list(
            pool.map(
                lambda i: service.create_lora_training_client(SMOL, rank=RANK, seed=i, train_unembed=False).result(600),
                range(len(batches)),
            )
        )

        def service_step(i: int) -> None:
            fb = clients[i].forward_backward(batches[i], "cross_entropy")
            opt = clients[i].optim_step(adam)  # pipelined behind the forward_backward, as the SDK's users do
            fb.result(600), opt.result(600)

        def plain_round() -> None:
            for i, b in enumerate(batches):  # round robin, one adapter at a time
                plain_step(model, optimizers[f"a{i}"], f"a{i}", b)

        def service_round() -> None:
            list(pool.map(service_step, range(len(batches))))

        plain_round(), service_round()  # warm-up
        before = engine_stats_after(stack, time.time(), 30)
        times = {plain_round: 0.0, service_round: 0.0}
        for _ in range(steps):
            for run in times:
                t0 = time.perf_counter()
                run()
                times[run] += time.perf_counter() - t0
        after = engine_stats_after(stack, time.time(), 30)
    passes = after["passes"] - before["passes"]
    mean = (after["adapters_in_passes"] - before["adapters_in_passes"]) / max(passes, 1)
    print(f"  service side: {passes} forward_backward passes, {mean:.2f} adapters per pass on average", flush=True)
    tokens = sum(len(d.model_input.to_ints()) for b in batches for d in b) * steps
    return tokens / times[plain_round], tokens / times[service_round]


def sampler_paths(stack: Stack, adapters: int) -> list[str]:
    tb = TinkerbellClient(stack.url, api_key="tml-bench")
    paths = []
    for i in range(adapters):
        model_id = tb.add_lora(base_model=SMOL, rank=RANK, seed=i).result(600)["model_id"]
        paths.append(tb.save_state(model_id, f"bench{i}", for_sampler=True).result(600)["path"])
    return paths


def sampling(
    stack: Stack, prompts: list[list[int]], paths: list[str], new_tokens: int, sequential: int
) -> tuple[float, float]:
    tb = TinkerbellClient(stack.url, api_key="tml-bench")

    def call(j: int) -> int:
        out = tb.sample(
            prompts[j],
            base_model=SMOL,
            model_path=paths[j % len(paths)],
            max_tokens=new_tokens,
            temperature=1.0,
            stop=[],
            seed=j,
        ).result(1200)
        return sum(len(s["tokens"]) for s in out["sequences"])

    call(0)  # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        tokens = sum(pool.map(call, range(len(prompts))))
    concurrent = tokens / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    tokens = sum(call(j) for j in range(sequential))
    return concurrent, tokens / (time.perf_counter() - t0)


def generate_in_process(stack: Stack, prompts: list[list[int]], new_tokens: int, dtype: str) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from backends.models import resolve_model_dir
    from core.settings import Settings

    path = resolve_model_dir(SMOL, Settings.from_env(stack.env))
    base = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=32, target_modules="all-linear")).eval()
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.int64)  # (B, P) left-padded
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    kwargs = {
        "attention_mask": mask,
        "do_sample": True,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "pad_token_id": 0,
    }
    with torch.no_grad():
        model.generate(
            input_ids=ids[:2], **{**kwargs, "attention_mask": mask[:2], "max_new_tokens": 4, "min_new_tokens": 4}
        )
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, **kwargs)
    elapsed = time.perf_counter() - t0
    return (out.shape[1] - width) * len(prompts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adapters", default="1,4,8,16")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--sequential", type=int, default=8, help="sample calls timed one after another (rate only)")
    parser.add_argument("--skip-sampling", action="store_true")
    args = parser.parse_args()
    import torch

    from tasks.worker import tune_malloc

    tune_malloc()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows: list[tuple[str, str, float, float]] = []

    def add(row: tuple[str, str, float, float]) -> None:
        rows.append(row)
        print(f"{row[0]} {row[1]}: {row[2]:.1f} vs {row[3]:.1f} ({row[3] / row[2]:.2f}x)", flush=True)

    for dtype in args.dtypes.split(","):
        os.environ["TINKERBELL_DTYPE"] = dtype
        os.environ["TINKERBELL_AUTOSAVE"] = "0"  # both sides keep state in memory only
        redis, stack = start_stack(Path(tempfile.mkdtemp(prefix="tb-bench-models-")), args.threads, SMOL)
        try:
            for n in [int(a) for a in args.adapters.split(",")]:
                batches = [[datum(rng, 128)] for _ in range(n)]
                add((dtype, f"(a) {n} adapter(s) x 1x128, tokens/s", *training(stack, batches, args.steps, dtype)))
            lengths = np.linspace(16, 512, 8).astype(int).tolist()
            batches = [[datum(rng, n) for n in lengths]]
            add((dtype, "(b) 1 adapter, 8 datums of 16..512, tokens/s", *training(stack, batches, args.steps, dtype)))
            if not args.skip_sampling:
                prompts = [rng.integers(1, VOCAB, size=int(rng.integers(8, 32))).tolist() for _ in range(64)]
                paths = sampler_paths(stack, 8)
                concurrent, sequential = sampling(stack, prompts, paths, args.new_tokens, args.sequential)
                batched = generate_in_process(stack, prompts, args.new_tokens, dtype)
                add(
                    (
                        dtype,
                        f"(c) 64 prompts x {args.new_tokens} over 8 adapters vs HF generate batch 64, 1 adapter",
                        batched,
                        concurrent,
                    )
                )
                add(
                    (
                        dtype,
                        f"(c) same, 64 concurrent vs one call after another ({args.sequential} timed)",
                        sequential,
                        concurrent,
                    )
                )
        finally:
            stack.stop()
            redis.stop()
    print()
    print("| dtype | measurement | what a user would do | through the service | ratio |")
    print("|---|---|---:|---:|---:|")
    for dtype, name, plain, served in rows:
        print(f"| {dtype} | {name} | {plain:.1f} | {served:.1f} | {served / plain:.2f}x |")
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads {args.threads}, "
        f"steps {args.steps}; in-process sides: plain transformers + PEFT (round-robin / right-padded / generate)"
    )


if __name__ == "__main__":
    main()
