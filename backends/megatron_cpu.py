"""The few CUDA assumptions of megatron-core (0.16.1), shimmed for a CPU-only process (tests, laptops).

Used by backends.megatron_tp / megatron_rank only when a rank's device is the CPU; on a GPU nothing here runs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_lock = threading.Lock()


def apply_cpu_shims() -> None:
    """Process-wide part, after initialize_model_parallel. Idempotent."""
    from megatron.core.tensor_parallel import random as mp_random

    # The CUDA RNG tracker's fork() (around attention dropout and in the transformer block) reads CUDA RNG state.
    # Megatron's own "inference" tracker forks into a null context; dropout is 0, so nothing draws random numbers
    # there and it is exact. The tracker is module state returned by get_cuda_rng_tracker(), so modules that
    # imported that function by name see it too.
    mp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


@contextlib.contextmanager
def cpu_pass() -> Iterator[None]:
    """Around one forward+backward on a CPU rank: torch.cuda.current_device() answers "cpu".

    megatron-core allocates with device=torch.cuda.current_device() in GlobalMemoryBuffer (the unfused attention's
    baddbmm input), in RotaryEmbedding.get_emb (moves inv_freq there on first use) and in the tensor-parallel
    gathers (e.g. the QKV all-gather when there are fewer KV heads than ranks). On a torch build without CUDA that
    call can only raise, so answering "cpu" while our pass runs changes nothing else. (The default causal mask is
    built on CUDA too: the backend always passes an explicit one.)
    """
    if torch.cuda.is_available():  # a real GPU build: never patch
        yield
        return
    with _lock:
        original = torch.cuda.current_device
        torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
        try:
            yield
        finally:
            torch.cuda.current_device = original


def check_cpu_shims() -> None:
    """Fail loudly if the megatron-core internals the shims lean on have moved (a test calls this)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    with mp_random.get_cuda_rng_tracker().fork():
        pass
    with cpu_pass():
        buffer = parallel_state.get_global_memory_buffer().get_tensor((2, 3), torch.float32, "shim-check")
    if buffer.device.type != "cpu":
        raise RuntimeError("megatron-core CPU shim: the global memory buffer is not on the CPU")
