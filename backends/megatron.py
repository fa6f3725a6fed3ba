"""MegatronTrainingBackend: LoRA adapters on a megatron-core GPTModel, tensor-parallel over one worker's devices.

Same contract and checkpoint format as the HF backend (PEFT adapter_model.safetensors with HF key names, optimizer.pt,
tinkerbell.json), so adapters move freely between the two. Rank 0 is this object; other ranks follow (megatron_tp).
"""

from __future__ import annotations

import atexit
import json
import math
import secrets
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backends.base import AdamSpec, FwdBwdRequest, FwdBwdResult, LoraSpec
from backends.loader import BackendUnavailable
from backends.train_checks import check_adam, check_datum
from core.errors import NotFound, UserError
from core.settings import Settings

ADAPTER_CONFIG = "adapter_config.json"
STATE_META = "tinkerbell.json"
INSTALL_HINT = "pip install megatron-core==0.16.1"


@dataclass
class _Adapter:
    """Rank 0's bookkeeping; the weights live in MegatronRank.adapters on every rank."""

    model_id: str
    base_model: str
    lora: LoraSpec
    trainable: int
    steps: int = 0


@dataclass
class _Prepared:
    index: int  # slot in the caller's request list
    request: FwdBwdRequest
    tokens: list[np.ndarray]  # each (N,) int64
    targets: list[np.ndarray]  # each (N,) or (N, K) int64
    inputs: list[dict[str, torch.Tensor]]  # loss_fn_inputs as tensors (rank 0 only)


class MegatronTrainingBackend:
    """TrainingBackend on megatron-core: settings.tensor_parallel ranks over settings.device ("cpu",
    "cuda:0,cuda:1")."""

    def __init__(self, settings: Settings, dtype: torch.dtype | None = None) -> None:
        try:
            import megatron.core  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailable(
                f"training backend 'megatron' needs megatron-core ({exc}): {INSTALL_HINT}"
            ) from exc
        from backends.megatron_rank import MegatronRank
        from backends.megatron_tp import FollowerGroup, free_port, init_rank, rank_devices

        self.settings = settings
        try:
            self.devices = rank_devices(settings)
        except ValueError as exc:
            raise BackendUnavailable(f"training backend 'megatron': {exc}") from exc
        self.device = self.devices[0]
        self.dtype = dtype or getattr(torch, settings.torch_dtype_name)
        self.tp = len(self.devices)
        self._lock = threading.RLock()  # one call at a time: every rank must run the same sequence of calls
        self._adapters: dict[str, _Adapter] = {}
        self._bases: dict[str, dict[str, int]] = {}
        self._group = FollowerGroup(settings, self.devices, self.dtype) if self.tp > 1 else None
        init_method = self._group.init_method if self._group else f"tcp://127.0.0.1:{free_port()}"
        init_rank(0, self.tp, self.device, init_method)
        self._rank = MegatronRank(settings, 0, self.tp, self.device, self.dtype)
        if self._group is not None:
            self._collect("start")
            atexit.register(self.close)

    def close(self) -> None:
        """Stop the follower ranks (tensor_parallel > 1); the backend is unusable afterwards."""
        if self._group is not None:
            self._group.close()
            self._group = None

    # ---- running a call on every rank ------------------------------------------------------------------------
    def _call(self, method: str, *args: Any, **local: Any) -> Any:
        """Run MegatronRank.<method>(*args) on every rank; `local` keyword arguments go to rank 0 only."""
        with self._lock:
            if self._group is not None:
                self._group.send(method, args)
            try:
                result = getattr(self._rank, method)(*args, **local)
            except Exception as exc:
                if self._group is not None:
                    self._collect(method, local_failed=exc)
                raise
            if self._group is not None:
                answers = self._collect(method)
                if method == "export":
                    return [result] + [answers[r] for r in sorted(answers)]
            return result

    def _collect(self, method: str, local_failed: Exception | None = None) -> dict[int, Any]:
        assert self._group is not None
        answers = self._group.collect()
        failed = {r: v for r, (ok, v) in answers.items() if not ok}
        if failed and local_failed is None:
            self._group.broken = f"rank(s) {sorted(failed)} failed in {method}"
            raise RuntimeError(
                f"megatron tensor-parallel rank(s) failed in {method}; restart the "
                f"worker:\n{next(iter(failed.values()))}"
            )
        if local_failed is not None and len(failed) != len(answers):
            self._group.broken = f"rank 0 alone failed in {method}"
        return {r: v for r, (ok, v) in answers.items() if ok}

    # ---- adapters -------------------------------------------------------------------------------------------
    def _ensure_base(self, base_model: str) -> dict[str, int]:
        if base_model not in self._bases:
            from backends.models import resolve_model_dir

            path = resolve_model_dir(base_model, self.settings)
            if path is None:
                raise UserError(
                    f"base_model: unknown model {base_model!r} (not in TINKERBELL_MODELS_DIR, installed packages or "
                    "the local HF cache)"
                )
            self._bases[base_model] = self._call("load_base", base_model, str(path))
        return self._bases[base_model]

    def create_adapter(self, model_id: str, base_model: str, lora: LoraSpec) -> dict[str, Any]:
        """Create a fresh adapter (idempotent for the same base_model and LoraSpec). Returns its description."""
        existing = self._adapters.get(model_id)
        if existing is not None:
            if existing.base_model != base_model or existing.lora != lora:
                raise UserError(f"model_id: adapter {model_id!r} already exists with another base_model or lora_config")
            return self._info(existing)
        if not isinstance(lora.rank, int) or lora.rank < 1:
            raise UserError(f"lora_config.rank: must be a positive integer, got {lora.rank!r}")
        if not (isinstance(lora.alpha, (int, float)) and math.isfinite(lora.alpha) and lora.alpha > 0):
            raise UserError(f"lora_config.alpha: must be a positive number, got {lora.alpha!r}")
        if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
            raise UserError("lora_config: train_attn, train_mlp and train_unembed are all false; nothing to train")
        self._ensure_base(base_model)
        seed = lora.seed if lora.seed is not None else secrets.randbits(63)  # chosen here: every rank uses it
        trainable = self._call("create_adapter", model_id, base_model, lora, int(seed))
        adapter = _Adapter(model_id, base_model, lora, int(trainable))
        self._adapters[model_id] = adapter
        return self._info(adapter)

    def _info(self, a: _Adapter) -> dict[str, Any]:
        return {
            "model_id": a.model_id,
            "base_model": a.base_model,
            "lora": asdict(a.lora),
            "trainable_params": a.trainable,
            "vocab_size": self._bases[a.base_model]["vocab"],
            "device": ",".join(str(d) for d in self.devices),
        }

    def has_adapter(self, model_id: str) -> bool:
        return model_id in self._adapters

    def remove_adapter(self, model_id: str) -> None:
        """Forget the adapter, its gradients and optimizer state (no-op if unknown)."""
        if self._adapters.pop(model_id, None) is not None:
            self._call("remove_adapter", model_id)

    def _get(self, model_id: str) -> _Adapter:
        adapter = self._adapters.get(model_id)
        if adapter is None:
            raise NotFound(f"model_id: unknown adapter {model_id!r} on this worker")
        return adapter

    def trainable_parameters(self, model_id: str) -> list[torch.nn.Parameter]:
        """Rank 0's LoRA parameters of the adapter (its shards when tensor_parallel > 1)."""
        self._get(model_id)
        return list(self._rank.adapters[model_id].params.values())

    # ---- forward / backward ---------------------------------------------------------------------------------
    def _prepare(self, index: int, request: FwdBwdRequest) -> _Prepared:
        adapter = self._get(request.model_id)
        limits = self._bases[adapter.base_model]
        vocab, max_len = limits["vocab"], limits["max_len"]
        if not request.data:
            raise UserError("data: empty batch")
        tokens, targets, inputs = [], [], []
        for i, datum in enumerate(request.data):
            ids, target, converted = check_datum(i, datum, vocab, vocab, max_len, self.device)
            tokens.append(np.ascontiguousarray(ids))
            targets.append(np.ascontiguousarray(target))
            inputs.append(converted)
        return _Prepared(index, request, tokens, targets, inputs)

    def forward_backward(self, requests: list[FwdBwdRequest]) -> list[FwdBwdResult | Exception]:
        """Every request in one pass per base model; a failed request (bad input, its loss) fails alone in its slot."""
        results: list[FwdBwdResult | Exception | None] = [None] * len(requests)
        by_base: dict[str, list[_Prepared]] = {}
        for i, request in enumerate(requests):
            try:
                prepared = self._prepare(i, request)
            except Exception as exc:  # noqa: BLE001 - per-request failure, in its slot
                results[i] = exc
                continue
            by_base.setdefault(self._adapters[request.model_id].base_model, []).append(prepared)
        for base_model, batch in by_base.items():
            try:
                self._run(base_model, batch, results)
            except Exception as exc:  # noqa: BLE001 - the whole pass failed: every request in it did
                for p in batch:
                    if results[p.index] is None:
                        results[p.index] = exc
        return [r if r is not None else RuntimeError("request was not run") for r in results]

    def _run(self, base_model: str, batch: list[_Prepared], results: list[Any]) -> None:
        from losses import compute_loss

        outcomes: dict[int, tuple[Any, dict[str, float]] | Exception] = {}

        def loss_hook(views: list[list[torch.Tensor]], leaf: torch.Tensor) -> torch.Tensor | None:
            # Runs on rank 0 between forward and backward: each request's loss on its own logprob views.
            total = None
            for p, logprobs in zip(batch, views):
                try:
                    loss, metrics = compute_loss(p.request.loss_fn, logprobs, p.inputs, p.request.loss_fn_config or {})
                except Exception as exc:  # noqa: BLE001 - this request fails alone
                    outcomes[p.index] = exc
                    continue
                outcomes[p.index] = (loss, metrics)
                if not p.request.forward_only and loss.requires_grad:
                    total = loss if total is None else total + loss
            if total is None:
                return None
            (grad,) = torch.autograd.grad(total, leaf)
            return grad

        items = [(p.request.model_id, p.tokens, p.targets, not p.request.forward_only) for p in batch]
        logprobs = self._call("run_pass", base_model, items, loss_hook=loss_hook)
        for p, lp in zip(batch, logprobs):
            outcome = outcomes.get(p.index)
            if isinstance(outcome, Exception) or outcome is None:
                results[p.index] = outcome or RuntimeError("loss was not computed")
                continue
            outputs = [{"logprobs": a} for a in lp]
            results[p.index] = FwdBwdResult(
                loss_fn_outputs=outputs, metrics={k: float(v) for k, v in outcome[1].items()}
            )

    # ---- optimizer ------------------------------------------------------------------------------------------
    def optim_step(self, model_id: str, adam: AdamSpec) -> dict[str, float]:
        """AdamW step on the accumulated gradients (clipped when grad_clip_norm > 0), then zero them."""
        adapter = self._get(model_id)
        check_adam(adam)
        metrics = self._call("optim_step", model_id, adam)
        adapter.steps += 1
        return metrics

    def optim_steps(self, steps: list[tuple[str, AdamSpec]]) -> list[dict[str, float] | Exception]:
        """Several adapters' optimizer steps; per-step failures in their slot."""
        results: list[dict[str, float] | Exception] = []
        for model_id, adam in steps:
            try:
                results.append(self.optim_step(model_id, adam))
            except Exception as exc:  # noqa: BLE001 - per-step failure, in its slot
                results.append(exc)
        return results

    def discard_gradients(self, model_id: str) -> None:
        """Drop the gradients accumulated since the last optim_step, leaving weights and optimizer state alone."""
        self._get(model_id)
        self._call("discard_gradients", model_id)

    # ---- state ----------------------------------------------------------------------------------------------
    def save_state(self, model_id: str, directory: str, with_optimizer: bool) -> int:
        """Write the adapter in PEFT format with HF key names (+ optimizer.pt if asked). Returns bytes written."""
        from safetensors.torch import save_file

        from backends.hf import lora_config, lora_targets
        from backends.train_checks import ADAPTER_WEIGHTS, OPTIMIZER_STATE

        adapter = self._get(model_id)
        exported = self._call("export", model_id, with_optimizer)
        shards = exported if isinstance(exported, list) else [exported]
        full_shapes = self._rank.adapters[model_id].full_shapes
        state = {key: _unshard([s["params"][key] for s in shards], full_shapes[key]) for key in shards[0]["params"]}
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        lora = adapter.lora
        config = lora_config(
            lora.rank,
            float(lora.alpha),
            lora_targets(lora.train_attn, lora.train_mlp, lora.train_unembed),
            inference=True,
        )
        config.base_model_name_or_path = adapter.base_model
        config.save_pretrained(str(out))
        written = [ADAPTER_WEIGHTS, ADAPTER_CONFIG, STATE_META]
        if with_optimizer:
            torch.save(_unshard_optimizer(shards, list(state), full_shapes), out / OPTIMIZER_STATE)
            written.append(OPTIMIZER_STATE)
        meta = {
            "model_id": model_id,
            "base_model": adapter.base_model,
            "lora": asdict(lora),
            "steps": adapter.steps,
            "with_optimizer": bool(with_optimizer),
        }
        (out / STATE_META).write_text(json.dumps(meta, indent=2) + "\n")
        return sum((out / f).stat().st_size for f in written)

    def load_state(self, model_id: str, directory: str, with_optimizer: bool) -> None:
        """Restore weights (and optimizer state if asked; otherwise the optimizer restarts) into an existing adapter."""
        adapter = self._get(model_id)
        self._call("load", model_id, directory, with_optimizer)
        meta = Path(directory) / STATE_META
        if meta.is_file():
            try:
                adapter.steps = int(json.loads(meta.read_text()).get("steps", 0))
            except (ValueError, TypeError):
                pass

    def status(self) -> dict[str, Any]:
        from backends.hf import memory_bytes

        return {
            "device": ",".join(str(d) for d in self.devices),
            "tensor_parallel": self.tp,
            "base_models": sorted(self._bases),
            "adapters": sorted(self._adapters),
            "memory_bytes": memory_bytes(self.device),
            "broken": self._group.broken if self._group is not None else None,
        }


def _unshard(pieces: list[tuple[int | None, np.ndarray | None, np.ndarray]], shape: tuple[int, ...]) -> torch.Tensor:
    """Put a tensor split over ranks back together: pieces are (dim or None, indices held, values), one per rank."""
    dim, _, first = pieces[0]
    if dim is None:
        return torch.from_numpy(np.ascontiguousarray(first)).clone()
    full = np.zeros(shape, dtype=first.dtype)
    for _, held, values in pieces:
        if dim == 0:
            full[held] = values
        else:
            full[:, held] = values
    return torch.from_numpy(full)


def _unshard_optimizer(
    shards: list[dict[str, Any]], keys: list[str], full_shapes: dict[str, tuple[int, int]]
) -> dict[str, Any]:
    """The ranks' AdamW state_dicts -> one, as torch.optim.AdamW over the full PEFT-ordered parameters would save it."""
    first = shards[0]["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for i, per_param in first["state"].items():
        key = keys[int(i)]
        entry: dict[str, Any] = {}
        for name, value in per_param.items():
            if isinstance(value, np.ndarray) and value.ndim == 2:
                pieces = [(s["params"][key][0], s["params"][key][1], s["optimizer"]["state"][i][name]) for s in shards]
                entry[name] = _unshard(pieces, full_shapes[key])
            elif isinstance(value, np.ndarray):
                entry[name] = torch.from_numpy(np.array(value))
            else:
                entry[name] = value
        state[int(i)] = entry
    return {"state": state, "param_groups": first["param_groups"]}
