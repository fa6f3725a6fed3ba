"""What publishing an optim_step only after its autosave costs per step; prints a table.

Side by side in one run on SmolLM2, in one process: an SFT step (forward_backward of 8 x 128 tokens + optim_step) on
the HF backend, and the autosave that now finishes before the optim_step's result is published (adapter weights +
Adam state to the data dir). The write runs on a pool thread while the engine goes on, so other adapters do not
wait; the adapter's own client waits max(0, write - time to its next request) more per step.
Usage: python bench/autosave.py [--ranks 8,32] [--steps 3]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", default="8,32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import numpy as np
    import torch

    from backends.base import AdamSpec, Datum, FwdBwdRequest, LoraSpec
    from backends.hf_train import HFTrainingBackend
    from bench.megatron import _smollm2_models_dir
    from core.settings import DEFAULT_BASE_MODEL, Settings

    torch.set_num_threads(args.threads)
    models = _smollm2_models_dir()
    settings = Settings(models_dir=str(models), data_dir=str(models.parent / "data"), device="cpu")
    backend = HFTrainingBackend(settings, dtype=torch.float32)
    rng = np.random.default_rng(0)
    rows = []
    for rank in [int(r) for r in args.ranks.split(",")]:
        model_id = f"bench-r{rank}"
        backend.create_adapter(model_id, DEFAULT_BASE_MODEL, LoraSpec(rank=rank, seed=0))
        steps, saves = [], []
        for i in range(args.steps + 1):
            tokens = rng.integers(1, 49152, size=(8, 129))
            data = [Datum(t[:-1], {"target_tokens": t[1:], "weights": np.ones(128, np.float32)}) for t in tokens]
            t0 = time.perf_counter()
            backend.forward_backward([FwdBwdRequest(model_id, data)])
            backend.optim_steps([(model_id, AdamSpec())])
            t1 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                backend.save_state(model_id, tmp, True)
                t2 = time.perf_counter()
                size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
            if i:  # the first is a warm-up
                steps.append(t1 - t0)
                saves.append(t2 - t1)
        step, save = statistics.median(steps), statistics.median(saves)
        rows.append((rank, size / 2**20, step * 1e3, save * 1e3, save / step))
        backend.remove_adapter(model_id)
    print("| LoRA rank (all modules) | autosave (MiB) | SFT step 8x128 (ms) | autosave write (ms) | write / step |")
    print("|---:|---:|---:|---:|---:|")
    for rank, mib, step, save, ratio in rows:
        print(f"| {rank} | {mib:.1f} | {step:.0f} | {save:.0f} | {ratio:.1%} |")
    print(
        f"\n{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {args.threads}, data dir on "
        f"{tempfile.gettempdir()}; medians of {args.steps} steps"
    )


if __name__ == "__main__":
    main()
