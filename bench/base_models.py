"""What a memory budget that holds one base model costs: a SmolLM2 request when the model is still loaded, against
one that must first reload it (TINKERBELL_MODEL_MEMORY_GB too small for both, so each switch to the tiny model
unloads SmolLM2). What a user would do instead: keep both loaded (no budget: twice the memory, no reloads).

In one process, on the HF sampling backend the workers use; rounds alternate so drift falls on both alike.
Usage: python bench/base_models.py [--rounds 5] [--threads 2]
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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from backends.base import SamplingSpec
    from backends.hf import loaded_models, torch_device
    from backends.hf_sample import HFSamplingBackend
    from bench.megatron import _smollm2_models_dir
    from core.settings import DEFAULT_BASE_MODEL, Settings
    from tests.tiny_model import TINY_MODEL_NAME, build_tiny_model

    torch.set_num_threads(args.threads)
    models = _smollm2_models_dir()
    if not (models / TINY_MODEL_NAME / "config.json").is_file():
        build_tiny_model(models / TINY_MODEL_NAME)
    data = tempfile.mkdtemp(prefix="tb-bench-models-")
    sampler = HFSamplingBackend(Settings(models_dir=str(models), data_dir=data, model_idle_s=0))
    prompt, spec = list(range(1, 129)), SamplingSpec(max_tokens=1, temperature=0.0)

    def request(name: str) -> float:
        start = time.perf_counter()
        sampler.sample(name, None, prompt, spec, prompt_logprobs=True)  # compute_logprobs of 128 tokens
        return time.perf_counter() - start

    request(DEFAULT_BASE_MODEL)  # warm-up
    smol_bytes = loaded_models(torch_device("cpu"))[DEFAULT_BASE_MODEL]
    budget_gb = (smol_bytes + 1) / 2**30  # SmolLM2 fits, SmolLM2 + the tiny model does not
    resident, reloaded, tiny_bytes = [], [], 0
    for _ in range(args.rounds):
        sampler.settings = Settings(models_dir=str(models), data_dir=data, model_idle_s=0)
        request(DEFAULT_BASE_MODEL)  # loaded if the last round left it out
        resident.append(request(DEFAULT_BASE_MODEL))
        sampler.settings = Settings(models_dir=str(models), data_dir=data, model_idle_s=0, model_memory_gb=budget_gb)
        request(TINY_MODEL_NAME)  # loaded in SmolLM2's place
        held = loaded_models(torch_device("cpu"))
        assert sorted(held) == [TINY_MODEL_NAME], held
        tiny_bytes = held[TINY_MODEL_NAME]
        reloaded.append(request(DEFAULT_BASE_MODEL))  # SmolLM2 back in, the tiny model out
    both_bytes = smol_bytes + tiny_bytes
    a, b = statistics.median(resident), statistics.median(reloaded)
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads {args.threads}, "
        f"{args.rounds} rounds, SmolLM2-135M float32 ({smol_bytes / 2**20:.0f} MiB), prompt logprobs of 128 tokens\n"
    )
    print("| measurement | both kept loaded (no budget) | budget holds one (reload) | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| SmolLM2 request, median (ms) | {a * 1e3:.0f} | {b * 1e3:.0f} | {b / a:.1f}x |")
    print(f"| base-model weights held (MiB) | {both_bytes / 2**20:.0f} | {smol_bytes / 2**20:.0f} | |")


if __name__ == "__main__":
    main()
