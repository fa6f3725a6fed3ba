"""One tensor-parallel rank's share of the megatron backend: base models, adapter shards, the pass, the optimizer.

Every rank runs the same methods with the same arguments (rank 0 sends them); collectives happen only inside them.
Only rank 0 computes losses: it hands the other ranks d loss / d logprobs, so every rank runs the same backward.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

from backends.base import AdamSpec, LoraSpec
from backends.hf import lora_targets
from backends.megatron_lora import LoraModule, Routing, attach, detach, initial_weights, install, peft_keys, shard
from backends.megatron_model import HFWeights, Layout, ModelShape, build_gpt, load_hf_weights, shape_from_hf
from backends.train_checks import read_checkpoint, step_adam
from core.errors import UserError
from core.settings import Settings

log = logging.getLogger(__name__)

# One pass's work for one adapter: (model_id, tokens per datum (N,), target_tokens per datum (N,) or (N, K), train).
PassItem = tuple[str, list[np.ndarray], list[np.ndarray], bool]
# Rank 0's loss hook: (per item, per datum logprob views of `leaf`), leaf (B, L, K) -> d loss / d leaf, or None.
LossHook = Callable[[list[list[torch.Tensor]], torch.Tensor], torch.Tensor | None]


@dataclass
class RankBase:
    name: str
    shape: ModelShape
    layout: Layout
    model: Any  # megatron.core GPTModel, frozen, LoRA wrappers installed
    routing: Routing
    modules: dict[str, LoraModule]  # HF module name -> where its LoRA lives here


@dataclass
class RankAdapter:
    model_id: str
    base: RankBase
    lora: LoraSpec
    modules: list[LoraModule]
    params: dict[str, torch.nn.Parameter]  # PEFT key -> this rank's shard, in PEFT's order (optimizer.pt indices)
    split: dict[str, tuple[int | None, torch.Tensor]]  # PEFT key -> (dim it is split along or None, indices held)
    full_shapes: dict[str, tuple[int, int]]
    optimizer: torch.optim.AdamW


def new_optimizer(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    # Hyperparameters are set from AdamSpec at every optim_step (as the HF backend does).
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)


class MegatronRank:
    """State and computation of one rank; rank 0's instance lives in the worker, the others in follower processes."""

    def __init__(self, settings: Settings, rank: int, world: int, device: torch.device, dtype: torch.dtype) -> None:
        self.settings, self.rank, self.world, self.device, self.dtype = settings, rank, world, device, dtype
        self.bases: dict[str, RankBase] = {}
        self.adapters: dict[str, RankAdapter] = {}
        self.group = parallel_state.get_tensor_model_parallel_group()

    # ---- base models and adapters --------------------------------------------------------------------------
    def load_base(self, name: str, path: str) -> dict[str, int]:
        if name not in self.bases:
            shape = shape_from_hf(path, name)
            layout = Layout(shape, self.world, self.rank)
            model = build_gpt(shape, self.world, self.dtype, self.device)
            load_hf_weights(model, shape, layout, HFWeights(path))
            routing = Routing()
            modules = install(model, layout, routing)
            model.to(self.device)  # the wrappers' index buffers
            self.bases[name] = RankBase(name, shape, layout, model, routing, modules)
            log.info("megatron rank %d: loaded %s from %s", self.rank, name, path)
        shape = self.bases[name].shape
        return {"vocab": shape.vocab, "max_len": shape.max_len}

    def create_adapter(self, model_id: str, base_name: str, lora: LoraSpec, seed: int) -> int:
        """A fresh adapter (PEFT's initialisation, seeded alike on every rank). Returns its full parameter count."""
        base = self.bases[base_name]
        names = set(lora_targets(lora.train_attn, lora.train_mlp, lora.train_unembed))
        modules = [m for name, m in base.modules.items() if name.rsplit(".", 1)[-1] in names]
        full = initial_weights(modules, lora.rank, seed)
        params: dict[str, torch.nn.Parameter] = {}
        split: dict[str, tuple[int | None, torch.Tensor]] = {}
        for module in modules:
            dims = module.shard_dims()
            for key, dim in zip(peft_keys(module), dims):
                split[key] = (dim, module.index)
                params[key] = torch.nn.Parameter(shard(full[key], dim, module.index).to(self.device))
        shapes = {k: (int(v.shape[0]), int(v.shape[1])) for k, v in full.items()}
        adapter = RankAdapter(
            model_id, base, lora, modules, params, split, shapes, new_optimizer(list(params.values()))
        )
        attach(model_id, modules, params, float(lora.alpha) / lora.rank)
        self.adapters[model_id] = adapter
        return sum(a * b for a, b in shapes.values())

    def remove_adapter(self, model_id: str) -> None:
        adapter = self.adapters.pop(model_id, None)
        if adapter is not None:
            detach(model_id, adapter.modules)
            adapter.optimizer.state.clear()

    def discard_gradients(self, model_id: str) -> None:
        self.adapters[model_id].optimizer.zero_grad(set_to_none=True)

    # ---- the pass -------------------------------------------------------------------------------------------
    def run_pass(
        self, base_name: str, items: list[PassItem], loss_hook: LossHook | None = None
    ) -> list[list[np.ndarray]] | None:
        """One forward (+ backward) over every item's datums, each adapter on its own rows. Rank 0 returns logprobs."""
        base = self.bases[base_name]
        tokens = [t for item in items for t in item[1]]
        targets = [t for item in items for t in item[2]]
        lengths = [int(t.size) for t in tokens]
        widths = [1 if t.ndim == 1 else int(t.shape[1]) for t in targets]
        batch, width, k = len(tokens), max(lengths), max(widths)
        ids = torch.zeros((batch, width), dtype=torch.int64)  # (B, L), right-padded
        index = torch.zeros((batch, width, k), dtype=torch.int64)  # (B, L, K): target ids per position
        for i, (ids_i, target) in enumerate(zip(tokens, targets)):
            ids[i, : lengths[i]] = torch.from_numpy(ids_i)
            index[i, : lengths[i], : widths[i]] = torch.from_numpy(target).reshape(lengths[i], widths[i])
        segments, row = [], 0
        for model_id, datum_tokens, _, _ in items:
            segments.append((model_id, row, row + len(datum_tokens)))
            row += len(datum_tokens)
        train = any(item[3] for item in items)
        ids, index = ids.to(self.device), index.to(self.device)
        positions = torch.arange(width, device=self.device).expand(batch, width)  # (B, L)
        # Explicit causal mask (True = masked): megatron builds its default one on CUDA. Right padding needs no more.
        causal = torch.triu(torch.ones((width, width), dtype=torch.bool, device=self.device), diagonal=1)[None, None]
        base.routing.segments = segments
        try:
            with torch.enable_grad() if train else torch.no_grad(), self._device_context():
                logits = base.model(ids, positions, causal)  # (B, L, V/tp)
                logprobs = self._target_logprobs(logits, index, base.layout.vocab_start)  # (B, L, K)
                del logits
                leaf = logprobs.detach().requires_grad_(train)
                views, start = [], 0
                for _, datum_tokens, datum_targets, _ in items:
                    rows = range(start, start + len(datum_tokens))
                    views.append(
                        [leaf[r, : lengths[r], : widths[r]].reshape(datum_targets[r - start].shape) for r in rows]
                    )
                    start += len(datum_tokens)
                grad, failure = None, None
                if loss_hook is not None:
                    try:
                        grad = loss_hook(views, leaf)
                    except BaseException as exc:  # noqa: BLE001 - re-raised once the other ranks are released
                        failure = exc
                grad = self._share_grad(grad if train else None, leaf)
                if failure is not None:
                    raise failure
                if grad is not None:
                    logprobs.backward(grad)
        finally:
            base.routing.segments = []
        if self.rank != 0:
            return None
        return [[v.detach().to("cpu", torch.float32).numpy() for v in item_views] for item_views in views]

    def _device_context(self) -> contextlib.AbstractContextManager[None]:
        if self.device.type != "cpu":
            return contextlib.nullcontext()
        from backends.megatron_cpu import cpu_pass

        return cpu_pass()

    def _target_logprobs(self, logits: torch.Tensor, index: torch.Tensor, vocab_start: int) -> torch.Tensor:
        """Log-softmax over the whole vocabulary at `index` (B, L, K), from vocab-parallel logits (B, L, V/tp)."""
        logits = logits.float()
        if self.world == 1:  # the HF backend's exact computation
            return torch.log_softmax(logits, dim=-1).gather(-1, index)
        local = index - vocab_start
        inside = (local >= 0) & (local < logits.shape[-1])
        picked = logits.gather(-1, local.clamp(0, logits.shape[-1] - 1)) * inside  # (B, L, K), zero off this shard
        picked = reduce_from_tensor_model_parallel_region(picked, group=self.group)
        peak = logits.detach().amax(dim=-1, keepdim=True)  # (B, L, 1)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=self.group)
        total = reduce_from_tensor_model_parallel_region(
            (logits - peak).exp().sum(dim=-1, keepdim=True), group=self.group
        )  # (B, L, 1)
        return picked - (total.log() + peak)

    def _share_grad(self, grad: torch.Tensor | None, leaf: torch.Tensor) -> torch.Tensor | None:
        """Rank 0's d loss / d logprobs (or None) on every rank."""
        if self.world == 1:
            return grad
        flag = torch.tensor([0 if grad is None else 1], dtype=torch.int64, device=self.device)
        dist.broadcast(flag, src=0, group=self.group)
        if not int(flag.item()):
            return None
        buffer = grad.contiguous() if grad is not None else torch.empty_like(leaf)
        dist.broadcast(buffer, src=0, group=self.group)
        return buffer

    # ---- optimizer ------------------------------------------------------------------------------------------
    def optim_step(self, model_id: str, adam: AdamSpec) -> dict[str, float]:
        """AdamW on the accumulated gradients, clipped by the norm of the whole (unsharded) adapter; then zero them."""
        adapter = self.adapters[model_id]
        params = list(adapter.params.values())
        norm = self._grad_norm(adapter)
        if adam.grad_clip_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, adam.grad_clip_norm, torch.tensor(norm, device=self.device))
        step_adam(adapter.optimizer, adam)
        return {"grad_norm:mean": norm, "learning_rate:mean": float(adam.learning_rate)}

    def _grad_norm(self, adapter: RankAdapter) -> float:
        split_norms, whole_norms = [], []
        for key, param in adapter.params.items():
            if param.grad is not None:
                (whole_norms if adapter.split[key][0] is None else split_norms).append(
                    torch.linalg.vector_norm(param.grad)
                )
        if self.world == 1:  # as torch.nn.utils.get_total_norm does it
            norms = split_norms + whole_norms
            return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        # Replicated shards are equal on every rank (count once); split ones add up across ranks.
        squares = torch.zeros(2, dtype=torch.float64, device=self.device)
        if split_norms:
            squares[0] = torch.stack(split_norms).double().square().sum()
        if whole_norms:
            squares[1] = torch.stack(whole_norms).double().square().sum()
        split_sq = squares[:1].clone()
        dist.all_reduce(split_sq, group=self.group)
        return math.sqrt(float(split_sq[0]) + float(squares[1]))

    # ---- state ----------------------------------------------------------------------------------------------
    def export(self, model_id: str, with_optimizer: bool) -> dict[str, Any]:
        """This rank's shards (numpy) and how they are split, for rank 0 to put together in the PEFT layout."""
        adapter = self.adapters[model_id]
        out: dict[str, Any] = {"params": {}, "optimizer": None}
        for key, param in adapter.params.items():
            dim, held = adapter.split[key]
            out["params"][key] = (
                dim,
                None if dim is None else held.numpy(),
                param.detach().to("cpu", torch.float32).numpy(),
            )
        if with_optimizer:
            state = adapter.optimizer.state_dict()
            out["optimizer"] = {
                "param_groups": state["param_groups"],
                "state": {
                    i: {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
                    for i, s in state["state"].items()
                },
            }
        return out

    def load(self, model_id: str, directory: str, with_optimizer: bool) -> None:
        """Restore PEFT-format weights (and optimizer.pt) written by either backend; every rank reads its shards."""
        adapter = self.adapters[model_id]
        state, optimizer_state = read_checkpoint(directory, adapter.full_shapes, with_optimizer, "cpu")
        if optimizer_state is not None:
            optimizer_state = self._shard_optimizer(adapter, optimizer_state)
        with torch.no_grad():
            for key, param in adapter.params.items():
                dim, held = adapter.split[key]
                param.copy_(shard(state[key], dim, held).to(param.device, param.dtype))
                param.grad = None
        optimizer = new_optimizer(list(adapter.params.values()))
        if optimizer_state is not None:
            try:
                optimizer.load_state_dict(optimizer_state)
            except (ValueError, KeyError) as exc:
                raise UserError(f"path: optimizer state does not match this adapter ({exc})") from exc
        adapter.optimizer = optimizer

    def _shard_optimizer(self, adapter: RankAdapter, state: dict[str, Any]) -> dict[str, Any]:
        """A full (PEFT-ordered) AdamW state_dict -> this rank's, its moment tensors split like the parameters."""
        keys = list(adapter.params)
        try:
            per_param = dict(state["state"])
            out = {"param_groups": state["param_groups"], "state": {}}
            for i, s in per_param.items():
                dim, held = adapter.split[keys[int(i)]]
                full = adapter.full_shapes[keys[int(i)]]
                moved = {}
                for name, value in s.items():
                    if isinstance(value, torch.Tensor) and tuple(value.shape) == full:
                        value = shard(value, dim, held)
                    elif isinstance(value, torch.Tensor) and value.dim() > 0:
                        raise ValueError(f"state {i}.{name} has shape {tuple(value.shape)}, the parameter {full}")
                    moved[name] = value
                out["state"][int(i)] = moved
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise UserError(f"path: optimizer state does not match this adapter ({exc})") from exc
        return out
