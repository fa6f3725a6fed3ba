"""Megatron-core training backend (placeholder): fails at construction with what it needs; use the HF backend meanwhile."""

from __future__ import annotations

import importlib.util

from backends.loader import BackendUnavailable
from core.settings import Settings


class MegatronTrainingBackend:
    """Would train LoRA adapters with Megatron-core on CUDA GPUs. Not available in this build."""

    def __init__(self, settings: Settings) -> None:
        if importlib.util.find_spec("megatron") is None:
            raise BackendUnavailable(
                "training backend 'megatron' needs megatron-core and CUDA GPUs: pip install megatron-core "
                "(plus transformer-engine); or set TINKERBELL_TRAINING_BACKEND=hf (and TINKERBELL_USE_MEGATRON=0)"
            )
        if not settings.device.startswith("cuda"):
            raise BackendUnavailable("training backend 'megatron' needs a CUDA GPU (TINKERBELL_DEVICE=cuda:N)")
        raise BackendUnavailable(
            "training backend 'megatron' is not implemented in this Tinkerbell build yet; set TINKERBELL_TRAINING_BACKEND=hf"
        )
