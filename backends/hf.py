"""HF transformers backends: the per-process base-model cache that training and sampling share.

One `LoadedBase` per (base model, device, dtype) holds the model, its MultiLoraLinear layers and many named adapters.
Models load on first use; under TINKERBELL_MODEL_MEMORY_GB, loading one first unloads idle ones (`get_base`).
`HFTrainingBackend` (backends/hf_train.py) and `HFSamplingBackend` (backends/hf_sample.py) are re-exported here.
"""

from __future__ import annotations

import gc
import inspect
import itertools
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from backends.multilora import Route, Routing, inject, matches, rows_route, tokens_route
from core.errors import UserError
from core.settings import Settings

if TYPE_CHECKING:
    from peft import LoraConfig

    from backends.hf_sample import HFSamplingBackend
    from backends.hf_train import HFTrainingBackend

__all__ = [
    "HFSamplingBackend",
    "HFTrainingBackend",
    "LoadedBase",
    "get_base",
    "loaded_bases",
    "loaded_models",
    "memory_bytes",
    "torch_device",
]

log = logging.getLogger(__name__)

_BASES: dict[tuple[str, str, str], LoadedBase] = {}
_BASES_LOCK = threading.Lock()


def __getattr__(name: str) -> Any:  # lazy re-export, no import cycle
    if name == "HFTrainingBackend":
        from backends.hf_train import HFTrainingBackend

        return HFTrainingBackend
    if name == "HFSamplingBackend":
        from backends.hf_sample import HFSamplingBackend

        return HFSamplingBackend
    raise AttributeError(name)


def torch_device(name: str) -> torch.device:
    """settings.device -> torch.device. The worker pins its GPU with CUDA_VISIBLE_DEVICES, so cuda:N may be cuda:0
    here."""
    name = (name or "cpu").strip()
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {name!r}: CUDA is not available in this process "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__})"
            )
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            index = 0
        return torch.device("cuda", index)
    return torch.device(name)


def memory_bytes(device: torch.device) -> int:
    """CUDA memory allocated on `device`, or this process's resident set size on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _quiet() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        log.debug("could not quiet transformers logging", exc_info=True)


def lora_targets(train_attn: bool, train_mlp: bool, train_unembed: bool) -> list[str]:
    """Module names (Llama-style) that get LoRA for Tinker's train_* switches."""
    targets: list[str] = []
    if train_attn:
        targets += ["q_proj", "k_proj", "v_proj", "o_proj"]
    if train_mlp:
        targets += ["gate_proj", "up_proj", "down_proj"]
    if train_unembed:
        targets += ["lm_head"]
    return targets


class LoadedBase:
    """A base model on one device, every target Linear wrapped once in a MultiLoraLinear, plus named adapters.

    An adapter takes part in a forward only inside `routed(...)` / `routed_tokens(...)`, on its own rows, so gradients
    reach only its LoRA parameters. Callers hold `lock` around routing + forward (one engine thread owns the device).
    """

    def __init__(self, name: str, path: str, model: torch.nn.Module, device: torch.device) -> None:
        self.name, self.path, self.model, self.device = name, path, model, device
        self.dtype = next(model.parameters()).dtype
        # What TINKERBELL_MODEL_MEMORY_GB counts: the base weights, parameters + buffers (adapters are not in them).
        self.weight_bytes = int(model.get_memory_footprint())
        # While a training adapter is on it, or a generation loop runs on it, the model is never unloaded.
        self.trained: set[str] = set()  # names of training adapters (HFTrainingBackend)
        self.sampling = 0  # generation loops in progress (HFSamplingBackend)
        self.last_used = time.monotonic()
        self.unloaded = False
        self.lock = threading.RLock()
        self.routing = Routing()
        self.layers = inject(model, self.routing)  # module path -> MultiLoraLinear
        self._params: dict[str, dict[str, torch.nn.Parameter]] = {}  # adapter name -> PEFT-keyed parameters
        self._counter = itertools.count()
        self._tokenizer: Any = None
        config = model.config
        self.vocab_in = int(model.get_input_embeddings().num_embeddings)
        self.vocab_out = int(model.get_output_embeddings().out_features)
        self.max_len = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        eos: set[int] = set()
        for source in (getattr(model, "generation_config", None), config):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, (list, tuple)):
                eos.update(int(v) for v in value)
        self.eos_ids = sorted(eos)
        accepted = inspect.signature(model.forward).parameters
        # transformers 5.2x renamed past_key_values -> cache; support both spellings.
        self.cache_kw = "cache" if "cache" in accepted else "past_key_values"
        self.has_logits_to_keep = "logits_to_keep" in accepted

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def busy(self, now: float, idle_s: float) -> str | None:
        """Why the model must stay loaded, or None when it is idle: no adapter on it is being trained and nothing
        sampled from it in the last idle_s seconds."""
        if self.trained:
            return f"{len(self.trained)} adapter(s) being trained on it"
        if self.sampling:
            return "sampling from it now"
        if now - self.last_used < idle_s:
            return f"used {now - self.last_used:.0f} s ago"
        return None

    def release(self) -> None:
        """Drop the model's tensors and every adapter on it; a holder of this object sees `unloaded`."""
        with self.lock:
            self.unloaded = True
            self._params.clear()
            self.layers = {}
            self._tokenizer = None
            self.model = None  # type: ignore[assignment]  # the last reference: its tensors are freed

    def autocast(self) -> torch.autocast:
        """bf16 base: matmuls (LoRA ones included) in bf16 under autocast; LoRA weights and their grads stay fp32."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def decode_step(
        self, input_ids: torch.Tensor, cache: Any = None, last_only: bool = False
    ) -> tuple[torch.Tensor, Any]:
        """One cached forward: (n, T) ids -> ((n, T', V) logits, cache); T' = 1 with last_only (skips the rest)."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": True}
        if cache is not None:
            kwargs[self.cache_kw] = cache
        if last_only and self.has_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        with self.autocast():
            out = self.model(**kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        logits = out.logits if not last_only else out.logits[:, -1:]
        return logits, new_cache

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer

    # ---- adapters -------------------------------------------------------------------------------------------
    def unique_name(self, prefix: str) -> str:
        """An adapter name no other caller of this base holds (trainer and sampler share it)."""
        return f"{prefix}{next(self._counter)}"

    def adapter_names(self) -> list[str]:
        return sorted(self._params)

    def add_adapter(
        self, name: str, rank: int, alpha: float, targets: list[str], seed: int | None
    ) -> dict[str, torch.nn.Parameter]:
        """A fresh LoRA adapter on the target modules (PEFT's target_modules rule), initialised bit for bit as
        `torch.manual_seed(seed); get_peft_model(...)` would. Returns its fp32 parameters keyed as in PEFT's
        adapter_model.safetensors (`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`)."""
        if name in self._params:
            raise ValueError(f"adapter {name!r} already exists on {self.name}")
        chosen = [(path, layer) for path, layer in self.layers.items() if matches(path, targets)]
        if not chosen:
            raise ValueError(f"no module of {self.name} matches LoRA targets {targets}")
        params: dict[str, torch.nn.Parameter] = {}
        with self.lock, torch.random.fork_rng(devices=[]):
            # PEFT creates LoRA layers on the CPU, initializes them, then moves them to the base layer's device.
            torch.default_generator.manual_seed(seed if seed is not None else secrets.randbits(63))
            for path, layer in chosen:
                weights = layer.new_adapter(name, rank, alpha, self.device)
                params[f"base_model.model.{path}.lora_A.weight"] = weights.lora_A
                params[f"base_model.model.{path}.lora_B.weight"] = weights.lora_B
            self._params[name] = params
        return params

    def remove_adapter(self, name: str) -> None:
        """Drop the adapter from every layer (no-op if unknown)."""
        with self.lock:
            if self._params.pop(name, None) is None:
                return
            for layer in self.layers.values():
                layer.adapters.pop(name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def adapter_params(self, name: str) -> dict[str, torch.nn.Parameter]:
        """The adapter's LoRA parameters, keyed as in a PEFT adapter_model.safetensors."""
        return dict(self._params[name])

    # ---- routing --------------------------------------------------------------------------------------------
    @contextmanager
    def routed(self, rows: list[str | None]) -> Iterator[None]:
        """Forwards inside use adapter rows[i] on batch row i of their (B, T) input (B == len(rows)); None = base."""
        with self._route(rows_route(self._known(rows), self.device)):
            yield

    @contextmanager
    def routed_tokens(self, segments: list[tuple[str | None, int, int]]) -> Iterator[None]:
        """Forwards inside use adapter `name` on flattened (B*T) positions [start, end) of each segment; unlisted
        positions get the base model only. For packed training rows."""
        self._known([name for name, _, _ in segments])
        with self._route(tokens_route(segments, self.device)):
            yield

    def _known(self, names: list[str | None]) -> list[str | None]:
        unknown = sorted({n for n in names if n is not None and n not in self._params})
        if unknown:
            raise KeyError(f"unknown adapter(s) {unknown} on {self.name}")
        return names

    @contextmanager
    def _route(self, route: Route) -> Iterator[None]:
        previous, self.routing.route = self.routing.route, route
        try:
            yield
        finally:
            self.routing.route = previous


def settings_dtype(settings: Settings, dtype: torch.dtype | None = None) -> torch.dtype:
    """Base-model weights dtype: an explicit `dtype`, else settings.torch_dtype_name (fp32 on CPU, bf16 on CUDA)."""
    return dtype or getattr(torch, settings.torch_dtype_name)


def get_base(name: str, settings: Settings, device: torch.device, dtype: torch.dtype | None = None) -> LoadedBase:
    """The process-wide LoadedBase for (name, device, dtype), loading it on first use (dtype: see settings_dtype).

    With settings.model_memory_bytes, a model that would not fit beside those loaded on `device` first unloads idle
    ones, least recently used first (LoadedBase.busy); UserError naming the setting when that cannot make room.
    """
    dtype = settings_dtype(settings, dtype)
    key = (name, str(device), str(dtype))
    with _BASES_LOCK:
        base = _BASES.get(key)
        if base is not None:
            base.touch()
            return base
        from transformers import AutoModelForCausalLM

        from backends.models import resolve_model_dir

        path = resolve_model_dir(name, settings)
        if path is None:
            raise UserError(
                f"base_model: unknown model {name!r} (not in TINKERBELL_MODELS_DIR, installed packages or the local "
                "HF cache)"
            )
        _quiet()
        if settings.model_memory_bytes:
            _make_room(name, _weight_bytes(path, dtype), device, settings)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        model.to(device).eval().requires_grad_(False)
        base = LoadedBase(name, str(path), model, device)
        _BASES[key] = base
        log.info("loaded base model %s from %s on %s (%s, %d bytes)", name, path, device, dtype, base.weight_bytes)
        return base


def _weight_bytes(path: os.PathLike[str], dtype: torch.dtype) -> int:
    """Parameter + buffer bytes the model at path will take in dtype, from its config on the meta device (no
    weights read; equals the loaded model's get_memory_footprint)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        return int(AutoModelForCausalLM.from_config(config, dtype=dtype).get_memory_footprint())


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _make_room(name: str, need: int, device: torch.device, settings: Settings) -> None:
    """Unload idle models on `device`, least recently used first, until `need` more bytes fit in the limit (caller
    holds _BASES_LOCK). Raises UserError, unloading nothing, when even every idle one would not make enough room."""
    limit, idle_s = settings.model_memory_bytes, settings.model_idle_s
    setting = f"TINKERBELL_MODEL_MEMORY_GB={settings.model_memory_gb:g} ({_mib(limit)})"
    if need > limit:
        raise UserError(f"base_model: {name!r} needs {_mib(need)} of weights, more than {setting} holds")
    here = [(key, b) for key, b in _BASES.items() if key[1] == str(device)]
    used = sum(b.weight_bytes for _, b in here)
    now = time.monotonic()
    idle = sorted(((key, b) for key, b in here if b.busy(now, idle_s) is None), key=lambda item: item[1].last_used)
    if used - sum(b.weight_bytes for _, b in idle) + need > limit:
        busy = ", ".join(
            f"{b.name} ({_mib(b.weight_bytes)}, {b.busy(now, idle_s)})" for _, b in here if b.busy(now, idle_s)
        )
        raise UserError(
            f"base_model: {name!r} needs {_mib(need)} of weights; {_mib(limit - used)} of {setting} is free and the "
            f"models loaded are in use: {busy}. A model is idle once no adapter on it is trained and nothing was "
            f"sampled from it for TINKERBELL_MODEL_IDLE_S={idle_s:g} s; retry then, or raise the limit"
        )
    unloaded = []
    for key, base in idle:
        if used + need <= limit:
            break
        del _BASES[key]
        used -= base.weight_bytes
        base.release()
        unloaded.append(base.name)
    if unloaded:
        gc.collect()  # module trees may hold reference cycles: free their tensors now, not at the next collection
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("unloaded idle base model(s) %s from %s to make room for %s", ", ".join(unloaded), device, name)


def loaded_bases(device: torch.device | None = None) -> list[LoadedBase]:
    with _BASES_LOCK:
        return [b for (_, dev, _), b in _BASES.items() if device is None or dev == str(device)]


def loaded_models(device: torch.device) -> dict[str, int]:
    """{base model: weight bytes} of what is loaded on `device` now, for a backend's status()."""
    return {b.name: b.weight_bytes for b in loaded_bases(device)}


def lora_config(rank: int, alpha: float, targets: list[str], inference: bool = False) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        inference_mode=inference,
    )
