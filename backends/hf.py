"""HF transformers + PEFT backends: the per-process base-model cache that training and sampling share.

One `LoadedBase` per (base model, device) holds the model and a PEFT `LoraModel` tuner with many named adapters.
`HFTrainingBackend` (backends/hf_train.py) and `HFSamplingBackend` (backends/hf_sample.py) are re-exported here.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import secrets
import threading
import warnings
from typing import TYPE_CHECKING, Any

import torch

from core.errors import UserError
from core.settings import Settings

if TYPE_CHECKING:
    from peft import LoraConfig

    from backends.hf_sample import HFSamplingBackend
    from backends.hf_train import HFTrainingBackend

__all__ = ["HFSamplingBackend", "HFTrainingBackend", "LoadedBase", "get_base", "loaded_bases", "memory_bytes", "torch_device"]

log = logging.getLogger(__name__)

_BASES: dict[tuple[str, str], LoadedBase] = {}
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
    """settings.device -> torch.device. The worker pins its GPU with CUDA_VISIBLE_DEVICES, so cuda:N may be cuda:0 here."""
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
    """A base model on one device plus its named LoRA adapters (training and sampler ones alike).

    Only the active adapter takes part in a forward pass, so gradients reach only its LoRA parameters.
    Callers hold `lock` around activate()+forward (Celery's solo pool is single-threaded anyway).
    """

    def __init__(self, name: str, path: str, model: torch.nn.Module, device: torch.device) -> None:
        self.name, self.path, self.model, self.device = name, path, model, device
        self.lock = threading.RLock()
        self.tuner: Any = None  # peft LoraModel, created with the first adapter
        self._active: str | None = None
        self._dirty = False  # adapter set changed since the last activate()
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

    def decode_step(self, input_ids: torch.Tensor, cache: Any = None, last_only: bool = False) -> tuple[torch.Tensor, Any]:
        """One cached forward: (n, T) ids -> ((n, T', V) logits, cache); T' = 1 with last_only (skips the rest)."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": True}
        if cache is not None:
            kwargs[self.cache_kw] = cache
        if last_only and self.has_logits_to_keep:
            kwargs["logits_to_keep"] = 1
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

    def adapter_names(self) -> list[str]:
        return sorted(self.tuner.peft_config) if self.tuner is not None else []

    def new_adapter(self, config: LoraConfig, seed: int | None, prefix: str) -> str:
        """Inject a fresh LoRA adapter; `seed` makes its initial weights reproducible. Returns its internal name."""
        from peft import LoraModel

        name = f"{prefix}{next(self._counter)}"
        with self.lock, torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tied lm_head / multiple-adapter advice
            # PEFT creates LoRA layers on the CPU, initializes them, then moves them to the base layer's device.
            torch.default_generator.manual_seed(seed if seed is not None else secrets.randbits(63))
            if self.tuner is None:
                self.tuner = LoraModel(self.model, config, name)
            else:
                self.tuner.peft_config[name] = config
                self.tuner.inject_adapter(self.model, name)
            self.model.eval()
            self._dirty = True
        return name

    def delete_adapter(self, name: str) -> None:
        with self.lock, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "adapter X was active ... setting active adapter to Y": we re-activate anyway
            if self.tuner is None or name not in self.tuner.peft_config:
                return
            self.tuner.delete_adapter(name)
            self._dirty = True
            if not self.tuner.peft_config:  # last one gone: restore the plain modules (faster forward)
                self.model = self.tuner.unload()
                if hasattr(self.model, "peft_config"):
                    del self.model.peft_config
                self.tuner = None
                self._active = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def activate(self, name: str | None, trainable: bool = False) -> None:
        """Make `name` the only active adapter (None: plain base model)."""
        if self.tuner is None:
            if name is not None:
                raise KeyError(name)
            return
        if name is None:
            if self._active is not None or self._dirty:
                self.tuner.disable_adapter_layers()
        elif self._active != name or self._dirty:
            self.tuner.enable_adapter_layers()
            self.tuner.set_adapter(name, inference_mode=not trainable)
        self._active, self._dirty = name, False

    def adapter_params(self, name: str) -> dict[str, torch.nn.Parameter]:
        """The adapter's LoRA parameters, keyed as in a PEFT adapter_model.safetensors (adapter name removed)."""
        params: dict[str, torch.nn.Parameter] = {}
        for path, module in self.model.named_modules():
            for kind in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
                container = getattr(module, kind, None)
                if container is None or name not in container:
                    continue
                item = container[name]
                if isinstance(item, torch.nn.Parameter):  # embedding LoRA stores bare parameters
                    params[f"base_model.model.{path}.{kind}"] = item
                else:
                    params[f"base_model.model.{path}.{kind}.weight"] = item.weight
        return params


def get_base(name: str, settings: Settings, device: torch.device, dtype: torch.dtype | None = None) -> LoadedBase:
    """The process-wide LoadedBase for (name, device), loading it on first use (float32 unless dtype says)."""
    key = (name, str(device))
    with _BASES_LOCK:
        base = _BASES.get(key)
        if base is not None:
            return base
        from transformers import AutoModelForCausalLM

        from backends.models import resolve_model_dir

        path = resolve_model_dir(name, settings)
        if path is None:
            raise UserError(f"base_model: unknown model {name!r} (not in TINKERBELL_MODELS_DIR, installed packages or the local HF cache)")
        _quiet()
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
        model.to(device).eval().requires_grad_(False)
        base = LoadedBase(name, str(path), model, device)
        _BASES[key] = base
        log.info("loaded base model %s from %s on %s", name, path, device)
        return base


def loaded_bases(device: torch.device | None = None) -> list[LoadedBase]:
    with _BASES_LOCK:
        return [b for (_, dev), b in _BASES.items() if device is None or dev == str(device)]


def lora_config(rank: int, alpha: float, targets: list[str], inference: bool = False) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", inference_mode=inference
    )
