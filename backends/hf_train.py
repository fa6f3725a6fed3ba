"""HFTrainingBackend: many LoRA adapters on one shared base model, each with its own AdamW and gradients.

forward_backward packs every request's datums into rows and runs them in one forward and one backward. Gradients
accumulate until optim_step. Saved state is PEFT format (adapter_model.safetensors + adapter_config.json, loadable
by PEFT and vLLM) plus optimizer.pt and tinkerbell.json.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from backends.base import AdamSpec, FwdBwdRequest, FwdBwdResult, LoraSpec
from backends.hf import (
    LoadedBase,
    get_base,
    loaded_bases,
    loaded_models,
    lora_config,
    lora_targets,
    memory_bytes,
    settings_dtype,
    torch_device,
)
from backends.multilora import pack
from backends.train_checks import ADAPTER_WEIGHTS, OPTIMIZER_STATE, check_adam, check_datum, read_checkpoint, step_adam
from core.errors import NotFound, UserError
from core.settings import Settings

ADAPTER_CONFIG = "adapter_config.json"
STATE_META = "tinkerbell.json"


@dataclass
class _Adapter:
    model_id: str
    base: LoadedBase
    name: str  # its name on the LoadedBase (shared with samplers, so not the model id)
    lora: LoraSpec
    config: Any  # peft LoraConfig
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.AdamW
    steps: int = 0


@dataclass
class _Prepared:
    adapter: _Adapter
    request: FwdBwdRequest
    tokens: list[torch.Tensor]  # each (N_i,) int64
    targets: list[torch.Tensor]  # each (N_i,) or (N_i, K) int64
    inputs: list[dict[str, torch.Tensor]]


def _new_optimizer(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    # Hyperparameters are set from AdamSpec at every optim_step.
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)


class HFTrainingBackend:
    """TrainingBackend on HF transformers and our MultiLoraLinear. Base weights in settings.torch_dtype_name (an
    explicit dtype= overrides); LoRA weights, gradients and optimizer state always float32."""

    def __init__(self, settings: Settings, dtype: torch.dtype | None = None) -> None:
        self.settings = settings
        self.device = torch_device(settings.device)
        self.dtype = settings_dtype(settings, dtype)
        self._adapters: dict[str, _Adapter] = {}
        self.last_pass: dict[str, Any] = {}  # the last forward_backward's packing, for the engine's metrics

    # ---- adapters -------------------------------------------------------------------------------------------
    def create_adapter(self, model_id: str, base_model: str, lora: LoraSpec) -> dict[str, Any]:
        """Create a fresh adapter (idempotent for the same base_model and LoraSpec). Returns its description."""
        existing = self._adapters.get(model_id)
        if existing is not None:
            if existing.base.name != base_model or existing.lora != lora:
                raise UserError(f"model_id: adapter {model_id!r} already exists with another base_model or lora_config")
            return self._info(existing)
        if not isinstance(lora.rank, int) or lora.rank < 1:
            raise UserError(f"lora_config.rank: must be a positive integer, got {lora.rank!r}")
        if not (isinstance(lora.alpha, (int, float)) and math.isfinite(lora.alpha) and lora.alpha > 0):
            raise UserError(f"lora_config.alpha: must be a positive number, got {lora.alpha!r}")
        targets = lora_targets(lora.train_attn, lora.train_mlp, lora.train_unembed)
        if not targets:
            raise UserError("lora_config: train_attn, train_mlp and train_unembed are all false; nothing to train")
        base = get_base(base_model, self.settings, self.device, self.dtype)
        with base.lock:
            name = base.unique_name("train")
            params = base.add_adapter(name, lora.rank, float(lora.alpha), targets, lora.seed)
            base.trained.add(name)  # the base model stays loaded while this adapter is on it
        config = lora_config(lora.rank, float(lora.alpha), targets)  # only to write adapter_config.json
        adapter = _Adapter(model_id, base, name, lora, config, params, _new_optimizer(list(params.values())))
        self._adapters[model_id] = adapter
        return self._info(adapter)

    def _info(self, a: _Adapter) -> dict[str, Any]:
        return {
            "model_id": a.model_id,
            "base_model": a.base.name,
            "lora": asdict(a.lora),
            "trainable_params": int(sum(p.numel() for p in a.params.values())),
            "vocab_size": a.base.vocab_out,
            "device": str(self.device),
        }

    def has_adapter(self, model_id: str) -> bool:
        return model_id in self._adapters

    def remove_adapter(self, model_id: str) -> None:
        """Forget the adapter, its gradients and optimizer state (no-op if unknown)."""
        adapter = self._adapters.pop(model_id, None)
        if adapter is None:
            return
        adapter.optimizer.state.clear()
        adapter.params.clear()
        adapter.base.remove_adapter(adapter.name)
        adapter.base.trained.discard(adapter.name)
        adapter.base.touch()  # idle from now on, once nothing else uses it (TINKERBELL_MODEL_IDLE_S)

    def trainable_parameters(self, model_id: str) -> list[torch.nn.Parameter]:
        """The adapter's LoRA parameters (float32), in optimizer order."""
        return list(self._get(model_id).params.values())

    def _get(self, model_id: str) -> _Adapter:
        adapter = self._adapters.get(model_id)
        if adapter is None:
            raise NotFound(f"model_id: unknown adapter {model_id!r} on this worker")
        return adapter

    # ---- forward / backward ---------------------------------------------------------------------------------
    def _prepare(self, request: FwdBwdRequest) -> _Prepared:
        adapter = self._get(request.model_id)
        base = adapter.base
        if not request.data:
            raise UserError("data: empty batch")
        tokens, targets, inputs = [], [], []
        for i, datum in enumerate(request.data):
            ids, _, converted = check_datum(i, datum, base.vocab_in, base.vocab_out, base.max_len, self.device)
            tokens.append(torch.tensor(ids))
            targets.append(converted["target_tokens"])
            inputs.append(converted)
        return _Prepared(adapter, request, tokens, targets, inputs)

    def forward_backward(self, requests: list[FwdBwdRequest]) -> list[FwdBwdResult | Exception]:
        """All requests in one packed forward and one backward per base model. A request that fails validation
        or its loss gets its UserError in its slot and changes no adapter's gradients."""
        results: list[FwdBwdResult | Exception | None] = [None] * len(requests)
        by_base: dict[int, list[tuple[int, _Prepared]]] = {}
        for slot, request in enumerate(requests):
            try:
                prepared = self._prepare(request)
            except UserError as exc:
                results[slot] = exc
                continue
            by_base.setdefault(id(prepared.adapter.base), []).append((slot, prepared))
        stats = {"adapters": 0, "requests": 0, "tokens": 0, "positions": 0}
        for group in by_base.values():
            for key, value in self._pass(group, results).items():
                stats[key] += value
        padding = 1 - stats["tokens"] / stats["positions"] if stats["positions"] else 0.0
        self.last_pass = {**stats, "padding_fraction": padding}
        return results  # type: ignore[return-value]  # every slot is filled

    def _pass(self, group: list[tuple[int, _Prepared]], results: list[Any]) -> dict[str, int]:
        """One forward over all the group's datums packed into rows, per-request losses, one backward."""
        from losses import compute_loss

        base = group[0][1].adapter.base
        datums = [(p, i) for _, p in group for i in range(len(p.tokens))]  # (request, datum index)
        packed = pack([p.tokens[i] for p, i in datums])
        lengths, starts, flat = packed.lengths, packed.starts, packed.positions
        # An adapter's tokens go to its LoRA matmuls in request then datum order, whatever the packing.
        segments = [(p.adapter.name, starts[k], starts[k] + lengths[k]) for k, (p, _) in enumerate(datums)]
        widths = [1 if p.targets[i].dim() == 1 else int(p.targets[i].shape[1]) for p, i in datums]
        index = torch.zeros((flat, max(widths)), dtype=torch.int64, device=self.device)  # (B*W, K)
        for k, (p, i) in enumerate(datums):
            index[starts[k] : starts[k] + lengths[k], : widths[k]] = p.targets[i].reshape(lengths[k], widths[k])
        train = any(not p.request.forward_only for _, p in group)
        with base.lock, torch.set_grad_enabled(train):
            with base.autocast(), base.routed_tokens(segments):
                # position_ids restart at 0 per datum and attention_mask is None: transformers sees packed
                # sequences and builds a block-diagonal causal mask (tests/test_multilora.py checks isolation).
                ids, positions = packed.ids.to(self.device), packed.position_ids.to(self.device)  # (B, W) each
                logits = base.model(input_ids=ids, position_ids=positions, use_cache=False).logits  # (B, W, V)
            # One log_softmax and one gather over the whole batch: slicing (B, W, V) per datum would make autograd
            # allocate a zero (B, W, V) gradient per datum on the way back (measured: ~30% of an SmolLM2 step).
            # log_softmax keeps only its output for backward, so the logits go at once (del below).
            logits = logits.float().view(flat, -1)  # (B*W, V); position j predicts target j
            lp_all = torch.log_softmax(logits, dim=-1).gather(-1, index)  # (B*W, K)
            del logits
            losses: list[torch.Tensor] = []
            trained: dict[int, torch.nn.Parameter] = {}
            k = 0
            for slot, p in group:
                logprobs = []  # per datum (N,) or (N, K)
                for i in range(len(p.tokens)):
                    lp = lp_all[starts[k] : starts[k] + lengths[k], : widths[k]].reshape(p.targets[i].shape)
                    logprobs.append(lp.detach() if p.request.forward_only else lp)
                    k += 1
                try:
                    loss, metrics = compute_loss(p.request.loss_fn, logprobs, p.inputs, p.request.loss_fn_config or {})
                except torch.OutOfMemoryError:
                    raise
                except UserError as exc:
                    results[slot] = exc
                    continue
                except Exception as exc:  # noqa: BLE001 -- a loss that breaks fails its own request only
                    results[slot] = UserError(f"loss_fn {p.request.loss_fn!r}: {type(exc).__name__}: {exc}")
                    continue
                if not p.request.forward_only and loss.requires_grad:
                    losses.append(loss)
                    trained.update((id(t), t) for t in p.adapter.params.values())
                outputs = [{"logprobs": lp.detach().to("cpu", torch.float32).numpy()} for lp in logprobs]
                metrics = {key: float(v) for key, v in metrics.items()}
                results[slot] = FwdBwdResult(loss_fn_outputs=outputs, metrics=metrics)
            if losses:
                # inputs=: only adapters with a surviving training request accumulate (a failed or forward-only
                # request's adapter would otherwise get zero .grad tensors, and AdamW steps on zeros).
                torch.autograd.backward(torch.stack(losses).sum(), inputs=list(trained.values()))
        tokens = sum(lengths)
        return {
            "adapters": len({p.adapter.model_id for _, p in group}),
            "requests": len(group),
            "tokens": tokens,
            "positions": flat,
        }

    # ---- optimizer ------------------------------------------------------------------------------------------
    def optim_step(self, model_id: str, adam: AdamSpec) -> dict[str, float]:
        """AdamW step on the accumulated gradients (clipped when grad_clip_norm > 0), then zero them."""
        adapter = self._get(model_id)
        check_adam(adam)
        params = list(adapter.params.values())
        with adapter.base.lock:
            grads = [p.grad for p in params if p.grad is not None]
            if adam.grad_clip_norm > 0:
                norm = float(torch.nn.utils.clip_grad_norm_(params, adam.grad_clip_norm))
            elif grads:
                norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            else:
                norm = 0.0
            step_adam(adapter.optimizer, adam)
        adapter.steps += 1
        return {"grad_norm:mean": norm, "learning_rate:mean": float(adam.learning_rate)}

    def optim_steps(self, steps: list[tuple[str, AdamSpec]]) -> list[dict[str, float] | Exception]:
        """optim_step for each (model_id, AdamSpec); a failed step's error in its slot, the others still run."""
        results: list[dict[str, float] | Exception] = []
        for model_id, adam in steps:
            try:
                results.append(self.optim_step(model_id, adam))
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 -- per-step result
                results.append(exc)
        return results

    def discard_gradients(self, model_id: str) -> None:
        """Drop the gradients accumulated since the last optim_step, leaving weights and optimizer state alone."""
        adapter = self._get(model_id)
        with adapter.base.lock:
            adapter.optimizer.zero_grad(set_to_none=True)

    # ---- state ----------------------------------------------------------------------------------------------
    def save_state(self, model_id: str, directory: str, with_optimizer: bool) -> int:
        """Write the adapter (PEFT format) and, if asked, its optimizer state into directory. Returns bytes written."""
        from safetensors.torch import save_file

        adapter = self._get(model_id)
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: p.detach().to("cpu").contiguous() for k, p in adapter.params.items()}
        save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = copy.deepcopy(adapter.config)
        config.base_model_name_or_path = adapter.base.name
        config.inference_mode = True
        config.save_pretrained(str(out))
        written = [ADAPTER_WEIGHTS, ADAPTER_CONFIG, STATE_META]
        if with_optimizer:
            torch.save(adapter.optimizer.state_dict(), out / OPTIMIZER_STATE)
            written.append(OPTIMIZER_STATE)
        meta = {
            "model_id": model_id,
            "base_model": adapter.base.name,
            "lora": asdict(adapter.lora),
            "steps": adapter.steps,
            "with_optimizer": bool(with_optimizer),
        }
        (out / STATE_META).write_text(json.dumps(meta, indent=2) + "\n")
        return sum((out / f).stat().st_size for f in written)

    def load_state(self, model_id: str, directory: str, with_optimizer: bool) -> None:
        """Restore weights (and optimizer state if asked; otherwise the optimizer restarts) into an existing adapter."""
        adapter = self._get(model_id)
        expected = {k: tuple(p.shape) for k, p in adapter.params.items()}
        state, optimizer_state = read_checkpoint(directory, expected, with_optimizer, self.device)
        with adapter.base.lock, torch.no_grad():
            for key, param in adapter.params.items():
                param.copy_(state[key].to(param.device, param.dtype))
                param.grad = None
            optimizer = _new_optimizer(list(adapter.params.values()))
            if optimizer_state is not None:
                try:
                    optimizer.load_state_dict(optimizer_state)
                except (ValueError, KeyError) as exc:
                    raise UserError(f"path: optimizer state does not match this adapter ({exc})") from exc
            adapter.optimizer = optimizer
        src = Path(directory)
        if (src / STATE_META).is_file():
            try:
                adapter.steps = int(json.loads((src / STATE_META).read_text()).get("steps", 0))
            except (ValueError, TypeError):
                pass

    def status(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "base_models": sorted({b.name for b in loaded_bases(self.device)}),
            "model_bytes": loaded_models(self.device),
            "adapters": sorted(self._adapters),
            "memory_bytes": memory_bytes(self.device),
        }
