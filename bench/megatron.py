"""Tokens/s of SFT steps (forward_backward + optim_step) on SmolLM2, Megatron vs HF backend, side by side.

`python -m bench.megatron [--batch 8 --seq 128 --steps 3 --device cpu --dtype float32]`; prints one table.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _smollm2_models_dir() -> Path:
    """A models dir holding the converted SmolLM2 (from the packaged GGUF, converted once, as the tests share it)."""
    from backends.models import convert_packaged_model
    from core.settings import DEFAULT_BASE_MODEL, Settings

    root = Path(os.environ.get("TINKERBELL_BENCH_DIR") or Path(tempfile.gettempdir()) / "tb-bench-megatron")
    link = root / "models" / DEFAULT_BASE_MODEL.replace("/", "--")
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        converted = convert_packaged_model(
            DEFAULT_BASE_MODEL, Settings.from_env({"TINKERBELL_DATA_DIR": str(root / "converted")})
        )
        link.symlink_to(converted, target_is_directory=True)
    return link.parent


def _batch(batch: int, seq: int, vocab: int, seed: int) -> list:
    from backends.base import Datum

    rng = np.random.default_rng(seed)
    data = []
    for _ in range(batch):
        tokens = rng.integers(0, vocab, seq)
        data.append(
            Datum(
                tokens=tokens,
                loss_fn_inputs={"target_tokens": np.roll(tokens, -1), "weights": np.ones(seq, np.float32)},
            )
        )
    return data


def measure(
    backends: dict[str, object], base_model: str, batch: int, seq: int, steps: int
) -> dict[str, dict[str, float]]:
    """Tokens/s of each backend over `steps` SFT steps after one warm-up; steps alternate between the backends, so
    a busy shared machine slows them alike."""
    from backends.base import AdamSpec, FwdBwdRequest, LoraSpec

    adam = AdamSpec(learning_rate=1e-4)
    ids, data, times, losses = {}, None, {name: [] for name in backends}, {}
    for name, backend in backends.items():
        ids[name] = f"bench-{name}:train:0"
        info = backend.create_adapter(ids[name], base_model, LoraSpec(rank=32, seed=0))
        data = data or _batch(batch, seq, int(info["vocab_size"]), seed=0)
    for step in range(steps + 1):
        for name, backend in backends.items():
            start = time.perf_counter()
            (result,) = backend.forward_backward([FwdBwdRequest(ids[name], data)])
            if isinstance(result, Exception):
                raise result
            backend.optim_step(ids[name], adam)
            if step:  # the first step warms caches up
                times[name].append(time.perf_counter() - start)
            losses[name] = result.metrics["loss:sum"] / (batch * seq)
    tokens = batch * seq
    return {
        name: {
            "tokens_per_s": tokens / float(np.median(times[name])),
            "step_s": float(np.median(times[name])),
            "loss": losses[name],
        }
        for name in backends
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.megatron", description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda:0 (HF) ; the Megatron backend uses the same device"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--only", choices=["hf", "megatron"], default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)

    import torch

    from backends.hf_train import HFTrainingBackend
    from backends.megatron import MegatronTrainingBackend
    from core.settings import DEFAULT_BASE_MODEL, Settings

    torch.manual_seed(0)
    models = _smollm2_models_dir()
    settings = Settings(
        models_dir=str(models), data_dir=str(models.parent / "data"), device=args.device, dtype=args.dtype
    )
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = {}
    if args.only in (None, "hf"):
        backends["hf"] = HFTrainingBackend(settings, dtype=dtype)
    if args.only in (None, "megatron"):
        backends["megatron"] = MegatronTrainingBackend(settings, dtype=dtype)
    rows = measure(backends, DEFAULT_BASE_MODEL, args.batch, args.seq, args.steps).items()
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available() else "no GPU"
    print(
        f"machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, {gpu}), torch "
        f"{torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(
        f"SmolLM2-135M, LoRA rank 32 (attn+mlp+unembed), batch {args.batch} x {args.seq} tokens, {args.dtype} on "
        f"{args.device}"
    )
    print(f"{'backend':<10} {'tokens/s':>10} {'s/step':>8} {'loss/token':>11}")
    for name, row in rows:
        print(f"{name:<10} {row['tokens_per_s']:>10.1f} {row['step_s']:>8.3f} {row['loss']:>11.4f}")


if __name__ == "__main__":
    main()
