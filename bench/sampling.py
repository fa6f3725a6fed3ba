"""Sampling throughput, HF backend vs vLLM backend side by side: 64 prompts x 128 new tokens on SmolLM2, base model
alone and base + 8 adapters in the mix. vLLM runs in its venv (`make vllm-venv`) behind `backends.vllm serve-stdio`.

Usage: .venv/bin/python bench/sampling.py [--prompts 64] [--new-tokens 128] [--skip-vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from backends.base import LoraSpec, SampleRequest, SamplingSpec
from core.settings import DEFAULT_BASE_MODEL, Settings


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {cores} cores, {gpu}; torch {torch.__version__}"


def requests(n: int, new_tokens: int, adapters: list[str | None]) -> list[SampleRequest]:
    """n prompts of 16..48 random tokens, row i on adapters[i % len(adapters)], never stopping before new_tokens."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        prompt = [1] + rng.integers(100, 40000, size=int(rng.integers(15, 48))).tolist()
        spec = SamplingSpec(max_tokens=new_tokens, temperature=0.7, seed=i, stop=[])
        out.append(SampleRequest(DEFAULT_BASE_MODEL, adapters[i % len(adapters)], prompt, spec))
    return out


def timed(sample_batch: Any, batch: list[SampleRequest]) -> float:
    """Generated tokens per second of one sample_batch call (after a short warm-up call)."""
    sample_batch(batch[:2])
    start = time.perf_counter()
    results = sample_batch(batch)
    elapsed = time.perf_counter() - start
    errors = [r for r in results if isinstance(r, Exception) or (isinstance(r, dict) and "error" in r)]
    assert not errors, errors[:2]
    tokens = sum(len(s["tokens"] if isinstance(s, dict) else s.tokens) for r in results for s in _sequences(r))
    return tokens / elapsed


def _sequences(result: Any) -> list[Any]:
    return result["sequences"] if isinstance(result, dict) else result.sequences


class VLLMWorker:
    """backends.vllm serve-stdio in the vLLM venv, with its own settings (adapter route, dtype)."""

    def __init__(self, settings: Settings, extra_env: dict[str, str]) -> None:
        python = Path(settings.vllm_venv) / "bin" / "python"
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TINKERBELL_MODELS_DIR": settings.models_dir,
            "TINKERBELL_DATA_DIR": settings.data_dir,
            "TINKERBELL_LOG_LEVEL": "WARNING",
            **extra_env,
        }
        self.proc = subprocess.Popen(
            [str(python), "-m", "backends.vllm", "serve-stdio"],
            cwd=ROOT,
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.call({"load": DEFAULT_BASE_MODEL})

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline() or '{"error": "vLLM process exited"}')
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def sample_batch(self, batch: list[SampleRequest]) -> list[dict[str, Any]]:
        return self.call({"requests": [asdict(r) for r in batch]})["results"]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip-vllm", action="store_true", help="HF rows only (e.g. on a GPU without the vLLM venv)")
    args = parser.parse_args()
    from backends.hf_sample import HFSamplingBackend
    from backends.hf_train import HFTrainingBackend
    from backends.models import convert_packaged_model

    work = Path(tempfile.mkdtemp(prefix="tb-bench-sampling-"))
    base = Settings.from_env()
    device = base.device
    converted = convert_packaged_model(DEFAULT_BASE_MODEL, Settings(data_dir=str(work / "convert")))
    models = work / "models"
    models.mkdir()
    (models / DEFAULT_BASE_MODEL.replace("/", "--")).symlink_to(converted, target_is_directory=True)
    common = {"models_dir": str(models), "data_dir": str(work / "data"), "device": device, "vllm_venv": base.vllm_venv}
    trainer = HFTrainingBackend(Settings(**common, dtype="float32"))
    adapters: list[str | None] = [None]
    for k in range(8):  # rank-32 adapters on attention, MLP and lm_head (LoRA B = 0: the cost is what is measured)
        trainer.create_adapter(f"bench:train:{k}", DEFAULT_BASE_MODEL, LoraSpec(rank=32, alpha=32.0, seed=k))
        trainer.save_state(f"bench:train:{k}", str(work / f"adapter{k}"), False)
        adapters.append(str(work / f"adapter{k}"))
    del trainer
    plain = requests(args.prompts, args.new_tokens, [None])
    mixed = requests(args.prompts, args.new_tokens, adapters)  # base + 8 adapters, interleaved
    rows: list[tuple[str, str, str, float]] = []
    for dtype in ("float32", "bfloat16"):
        hf = HFSamplingBackend(Settings(**common, dtype=dtype))
        rows.append(("HF generate", dtype, "base", timed(hf.sample_batch, plain)))
        if dtype == "bfloat16":
            rows.append(("HF generate", dtype, "base + 8 adapters", timed(hf.sample_batch, mixed)))
        print(rows[-1], flush=True)
    if not args.skip_vllm:
        for route in ("vllm", "auto"):
            label = "vLLM, LoRA on vLLM" if route == "vllm" else "vLLM default route (adapters on HF)"
            worker = VLLMWorker(Settings(**common), {"TINKERBELL_DTYPE": "bfloat16", "TINKERBELL_VLLM_ADAPTERS": route})
            try:
                rows.append((label, "bfloat16", "base", timed(worker.sample_batch, plain)))
                rows.append((label, "bfloat16", "base + 8 adapters", timed(worker.sample_batch, mixed)))
            finally:
                worker.close()
            print(rows[-2:], flush=True)
    print(f"\nSampling, {args.prompts} prompts x {args.new_tokens} new tokens, SmolLM2-135M, {device}: {machine()}\n")
    print("| backend | dtype | requests | tokens/s |\n|---|---|---|---|")
    for backend, dtype, mix, rate in rows:
        print(f"| {backend} | {dtype} | {mix} | {rate:.0f} |")


if __name__ == "__main__":  # the vLLM engine spawns processes: keep this guard
    main()
