"""Pick the configured training / sampling backend (DESIGN rule 5): imported lazily, one instance per process.

An unavailable backend raises BackendUnavailable with a message that says how to install it.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

from backends.base import SamplingBackend, TrainingBackend
from core.settings import Settings


class BackendUnavailable(RuntimeError):
    """The configured backend cannot run here (missing package or hardware); the message says how to fix it."""


# name -> (module, class, how to get it)
TRAINING_BACKENDS: dict[str, tuple[str, str, str]] = {
    "hf": ("backends.hf_train", "HFTrainingBackend", "pip install torch transformers peft safetensors"),
    "megatron": (
        "backends.megatron",
        "MegatronTrainingBackend",
        "pip install megatron-core==0.16.1 (CPU works for tests; GPUs for speed)",
    ),
}
SAMPLING_BACKENDS: dict[str, tuple[str, str, str]] = {
    "hf": ("backends.hf_sample", "HFSamplingBackend", "pip install torch transformers peft safetensors"),
    "vllm": (
        "backends.vllm",
        "VLLMSamplingBackend",
        "make vllm-venv, then run the sampling worker with $TINKERBELL_VLLM_VENV/bin/python",
    ),
}

_instances: dict[tuple[str, str, str], Any] = {}
_lock = threading.Lock()


def _build(kind: str, name: str, table: dict[str, tuple[str, str, str]], settings: Settings) -> Any:
    if name not in table:
        raise BackendUnavailable(
            f"unknown {kind} backend {name!r}; choose one of {sorted(table)} (TINKERBELL_{kind.upper()}_BACKEND)"
        )
    module_name, class_name, how = table[name]
    key = (kind, name, settings.device)
    with _lock:
        if key in _instances:
            return _instances[key]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise BackendUnavailable(
                f"{kind} backend {name!r} is not installed ({exc}); install it with: {how}"
            ) from exc
        instance = getattr(module, class_name)(settings)
        _instances[key] = instance
        return instance


def get_training_backend(settings: Settings | None = None) -> TrainingBackend:
    """The process's TrainingBackend chosen by settings.training_backend_name ("hf" | "megatron")."""
    settings = settings or Settings.from_env()
    return _build("training", settings.training_backend_name, TRAINING_BACKENDS, settings)


def get_sampling_backend(settings: Settings | None = None) -> SamplingBackend:
    """The process's SamplingBackend chosen by settings.sampling_backend_name ("hf" | "vllm")."""
    settings = settings or Settings.from_env()
    return _build("sampling", settings.sampling_backend_name, SAMPLING_BACKENDS, settings)
