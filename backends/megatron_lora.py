"""Multi-adapter LoRA on megatron-core's tensor-parallel linears (megatron-core ships none).

Each adapter keeps PEFT's per-module A/B pairs, sharded like the base layer, so the result equals unsharded LoRA:
column-parallel (QKV, gate/up, lm_head): A replicated, B split on the output dim; row-parallel (attention output,
down): A split on the input dim, x·A all-reduced before B (B replicated). Each adapter acts on its own batch rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)

from backends.megatron_model import ATTN_PARTS, HF_LAYER, MLP_PARTS, ColumnShard, Layout

PEFT_PREFIX = "base_model.model."


class Routing:
    """The current pass's rows: (adapter key, first row, end row) on the batch dim, in order, covering the batch."""

    def __init__(self) -> None:
        self.segments: list[tuple[str, int, int]] = []


@dataclass
class LoraPair:
    A: torch.nn.Parameter  # (r, in_local)
    B: torch.nn.Parameter  # (out_local, r)


class _LoraLinear(torch.nn.Module):
    """A frozen megatron linear (kept as `base`, whose weights it uses) plus every adapter's LoRA on it.

    The base matmul is done here with F.linear on the frozen weight, with megatron's own communication functions:
    megatron's linear autograd function always computes the weight gradient, one wasted GEMM per frozen layer.
    """

    def __init__(self, base: torch.nn.Module, routing: Routing) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        self.adapters: dict[str, tuple[float, list[LoraPair]]] = {}  # plain dict: LoRA weights are not base state

    def _lora(self, x: torch.Tensor, out_features: int) -> torch.Tensor | None:
        """Sum of each adapter's LoRA on its rows of x (s, b, in) -> (s, b, out_features), or None if none applies."""
        pieces: list[torch.Tensor | None] = []
        for key, start, end in self.routing.segments:
            entry = self.adapters.get(key)
            pieces.append(None if entry is None else self._delta(x[:, start:end], *entry))
        if all(p is None for p in pieces):
            return None
        if len(pieces) == 1:
            return pieces[0]
        filled = []
        for (_, start, end), piece in zip(self.routing.segments, pieces):
            filled.append(
                piece
                if piece is not None
                else x.new_zeros((x.shape[0], end - start, out_features), dtype=torch.float32)
            )
        return torch.cat(filled, dim=1)  # (s, b, out_features)

    def _delta(self, x: torch.Tensor, scale: float, pairs: list[LoraPair]) -> torch.Tensor:
        raise NotImplementedError


class ColumnLoRA(_LoraLinear):
    """ColumnParallelLinear + LoRA: per part, h = x·A (replicated), local rows of h·Bᵀ, fused like the base rows."""

    def __init__(self, base: torch.nn.Module, routing: Routing, shard: ColumnShard) -> None:
        super().__init__(base, routing)
        self.shard = shard
        self.register_buffer("order", shard.order, persistent=False)

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output: bool | None = None
    ) -> tuple[Any, Any]:
        base = self.base
        weight = base.weight if weight is None else weight  # tied lm_head: GPTModel passes the embedding weight
        bias = base.bias if not base.skip_bias_add else None
        out = F.linear(copy_to_tensor_model_parallel_region(x, group=base.tp_group), weight, bias)  # (s, b, out_local)
        delta = self._lora(x, out.shape[-1])
        if delta is not None:
            out = out + delta.to(out.dtype)
        gather = base.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            out = gather_from_tensor_model_parallel_region(out, group=base.tp_group)
        return out, (base.bias if base.skip_bias_add else None)

    def _delta(self, x: torch.Tensor, scale: float, pairs: list[LoraPair]) -> torch.Tensor:
        rank = pairs[0].A.shape[0]
        a = pairs[0].A if len(pairs) == 1 else torch.cat([p.A for p in pairs], dim=0)  # (P*r, in)
        h = F.linear(x.to(a.dtype), a)  # (s, n, P*r), identical on every rank
        # Backward all-reduces dh: each rank's B shard gives part of it, and A (replicated) needs the whole.
        h = copy_to_tensor_model_parallel_region(h, group=self.base.tp_group)
        outs = [F.linear(hp, p.B) for hp, p in zip(h.split(rank, dim=-1), pairs)]  # each (s, n, rows_p)
        delta = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if self.order is not None:
            delta = delta.index_select(-1, self.order)  # into megatron's fused row order
        return delta * scale


class RowLoRA(_LoraLinear):
    """RowParallelLinear + LoRA: h = all-reduce(x_local·A_local) (as the base's partial sums are), then h·Bᵀ."""

    def forward(self, x: torch.Tensor) -> tuple[Any, Any]:
        base = self.base
        out = reduce_from_tensor_model_parallel_region(F.linear(x, base.weight), group=base.tp_group)  # (s, b, out)
        delta = self._lora(x, out.shape[-1])
        if delta is not None:
            out = out + delta.to(out.dtype)
        if base.skip_bias_add:
            return out, base.bias
        return (out + base.bias if base.bias is not None else out), None

    def _delta(self, x: torch.Tensor, scale: float, pairs: list[LoraPair]) -> torch.Tensor:
        (pair,) = pairs
        h = reduce_from_tensor_model_parallel_region(
            F.linear(x.to(pair.A.dtype), pair.A), group=self.base.tp_group
        )  # (s, n, r)
        return F.linear(h, pair.B) * scale


@dataclass(frozen=True)
class LoraModule:
    """One PEFT target module (HF name) as this rank holds it: which wrapper and part, and how A/B are sharded."""

    name: str  # e.g. model.layers.0.self_attn.q_proj, lm_head
    layer: _LoraLinear
    part: int
    in_features: int
    out_features: int
    index: torch.Tensor = field(repr=False)  # column: B rows held here; row: A columns held here

    @property
    def column(self) -> bool:
        return isinstance(self.layer, ColumnLoRA)

    def shard_dims(self) -> tuple[int | None, int | None]:
        """Dim along which A and B are split (None: replicated)."""
        return (None, 0) if self.column else (1, None)


def install(model: Any, layout: Layout, routing: Routing) -> dict[str, LoraModule]:
    """Wrap every linear of a GPTModel that PEFT could target; returns HF module name -> LoraModule, in PEFT order."""
    s = layout.shape
    modules: dict[str, LoraModule] = {}
    for i, layer in enumerate(model.decoder.layers):
        attn, mlp, hf = layer.self_attention, layer.mlp, HF_LAYER.format(i=i)
        attn.linear_qkv = qkv = ColumnLoRA(attn.linear_qkv, routing, layout.qkv)
        attn.linear_proj = proj = RowLoRA(attn.linear_proj, routing)
        mlp.linear_fc1 = fc1 = ColumnLoRA(mlp.linear_fc1, routing, layout.fc1)
        mlp.linear_fc2 = fc2 = RowLoRA(mlp.linear_fc2, routing)
        outs = (s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim)
        for p, (name, out) in enumerate(zip(ATTN_PARTS, outs)):
            modules[f"{hf}.self_attn.{name}"] = LoraModule(
                f"{hf}.self_attn.{name}", qkv, p, s.hidden, out, layout.qkv.rows[p]
            )
        modules[f"{hf}.self_attn.o_proj"] = LoraModule(
            f"{hf}.self_attn.o_proj", proj, 0, s.heads * s.head_dim, s.hidden, layout.proj_cols
        )
        for p, name in enumerate(MLP_PARTS):
            modules[f"{hf}.mlp.{name}"] = LoraModule(f"{hf}.mlp.{name}", fc1, p, s.hidden, s.ffn, layout.fc1.rows[p])
        modules[f"{hf}.mlp.down_proj"] = LoraModule(f"{hf}.mlp.down_proj", fc2, 0, s.ffn, s.hidden, layout.fc2_cols)
    model.output_layer = head = ColumnLoRA(model.output_layer, routing, layout.vocab)
    modules["lm_head"] = LoraModule("lm_head", head, 0, s.hidden, s.vocab, layout.vocab.rows[0])
    return modules


def peft_keys(module: LoraModule) -> tuple[str, str]:
    return f"{PEFT_PREFIX}{module.name}.lora_A.weight", f"{PEFT_PREFIX}{module.name}.lora_B.weight"


def shard(full: torch.Tensor, dim: int | None, index: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a full (HF-shaped) LoRA tensor."""
    return full.clone() if dim is None else full.index_select(dim, index).clone()


def initial_weights(modules: list[LoraModule], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """Full PEFT-keyed LoRA weights as PEFT initialises them (A kaiming-uniform, B zero), the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for module in modules:
        key_a, key_b = peft_keys(module)
        bound = 1.0 / math.sqrt(module.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT use
        weights[key_a] = (torch.rand((rank, module.in_features), generator=generator) * 2 - 1) * bound
        weights[key_b] = torch.zeros((module.out_features, rank))
    return weights


def attach(key: str, modules: list[LoraModule], params: dict[str, torch.nn.Parameter], scale: float) -> None:
    """Hook an adapter's (local) parameters into the wrappers under `key`."""
    grouped: dict[int, tuple[_LoraLinear, dict[int, LoraPair]]] = {}
    for module in modules:
        key_a, key_b = peft_keys(module)
        grouped.setdefault(id(module.layer), (module.layer, {}))[1][module.part] = LoraPair(
            params[key_a], params[key_b]
        )
    for layer, pairs in grouped.values():
        layer.adapters[key] = (scale, [pairs[p] for p in sorted(pairs)])


def detach(key: str, modules: list[LoraModule]) -> None:
    for module in modules:
        module.layer.adapters.pop(key, None)
