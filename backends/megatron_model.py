"""A megatron-core GPTModel built from a Hugging Face Llama / Qwen2 / Qwen3 config, with the HF weights converted in.

Fused layouts as megatron-core expects them: QKV interleaved per query group ([q heads, k, v] per group) and
the gated MLP's fc1 as [gate shard; up shard] per rank. `Layout` says which HF rows/columns each rank holds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.errors import UserError

HF_LAYER = "model.layers.{i}"
ATTN_PARTS = ("q_proj", "k_proj", "v_proj")
MLP_PARTS = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class ModelShape:
    """What the conversion and the LoRA layout need to know about a base model."""

    family: str  # llama | qwen2 | qwen3
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    max_len: int
    eps: float
    rope_theta: float
    rope_scaling_factor: float | None  # llama3-style scaling, None for plain RoPE
    tied: bool
    qkv_bias: bool
    qk_norm: bool


def shape_from_hf(path: str | Path, name: str) -> ModelShape:
    """Read the HF config of `name` (a local model directory). Unsupported architectures are the user's error."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    family = str(getattr(config, "model_type", ""))
    if family not in ("llama", "qwen2", "qwen3"):
        raise UserError(
            f"base_model: {name!r} is a {family!r} model; the megatron backend supports llama, qwen2 and qwen3"
        )
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False):
        raise UserError(f"base_model: {name!r} has an MLP the megatron backend does not convert (needs silu, no bias)")
    if family == "qwen2" and getattr(config, "use_sliding_window", False):
        raise UserError(
            f"base_model: {name!r} uses sliding-window attention, which the megatron backend does not convert"
        )
    if family != "qwen2" and getattr(config, "attention_bias", False):
        raise UserError(
            f"base_model: {name!r} has attention biases on every projection; the megatron backend does not convert them"
        )
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = float(rope.get("rope_theta") or getattr(config, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    factor = None
    if rope_type == "llama3":
        # megatron-core's llama3 scaling has low/high frequency factors 1 and 4 over 8192 positions built in.
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        if any(float(rope.get(k, v)) != v for k, v in expected.items()):
            raise UserError(
                f"base_model: {name!r} rope scaling {rope} differs from the llama3 defaults megatron-core has"
            )
        factor = float(rope.get("factor", 8.0))
    elif rope_type != "default":
        raise UserError(
            f"base_model: {name!r} uses rope_type {rope_type!r}; the megatron backend supports default and llama3"
        )
    heads = int(config.num_attention_heads)
    return ModelShape(
        family=family,
        layers=int(config.num_hidden_layers),
        hidden=int(config.hidden_size),
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        ffn=int(config.intermediate_size),
        vocab=int(config.vocab_size),
        max_len=int(getattr(config, "max_position_embeddings", 0) or 0),
        eps=float(config.rms_norm_eps),
        rope_theta=theta,
        rope_scaling_factor=factor,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
    )


@dataclass(frozen=True)
class ColumnShard:
    """A column-parallel layer on one rank: per HF part, the rows of that part it holds, and how they interleave.

    local fused output = cat([part[rows[p]] for p in parts], dim=0)[order]  (order None: already in place)
    """

    parts: tuple[str, ...]
    rows: tuple[torch.Tensor, ...]
    order: torch.Tensor | None


class Layout:
    """Which slice of every HF tensor tensor-parallel rank `rank` of `tp` holds, in megatron-core's layouts."""

    def __init__(self, shape: ModelShape, tp: int, rank: int) -> None:
        s = shape
        for what, value in (("attention heads", s.heads), ("intermediate size", s.ffn), ("vocabulary", s.vocab)):
            if value % tp:
                raise UserError(f"base_model: {what} {value} is not divisible by tensor_parallel {tp}")
        if s.kv_heads % tp and tp % s.kv_heads:
            raise UserError(
                f"base_model: {s.kv_heads} key/value heads and tensor_parallel {tp}: one must divide the other"
            )
        self.shape, self.tp, self.rank = shape, tp, rank
        self.qkv = self._qkv()
        self.fc1 = self._even(MLP_PARTS, s.ffn)
        self.vocab = self._even(("lm_head",), s.vocab)
        self.vocab_start = rank * (s.vocab // tp)
        self.proj_cols = self._range(s.heads * s.head_dim)  # linear_proj input: this rank's attention heads
        self.fc2_cols = self._range(s.ffn)

    def _range(self, total: int) -> torch.Tensor:
        size = total // self.tp
        return torch.arange(self.rank * size, (self.rank + 1) * size)

    def _even(self, parts: tuple[str, ...], total: int) -> ColumnShard:
        rows = self._range(total)
        return ColumnShard(parts, tuple(rows for _ in parts), None)

    def _qkv(self) -> ColumnShard:
        s = self.shape
        per_group = s.heads // s.kv_heads
        fused: list[tuple[int, int]] = []  # (part index, HF row), megatron's order: [q heads, k, v] per group
        for g in range(s.kv_heads):
            for h in range(g * per_group, (g + 1) * per_group):
                fused += [(0, h * s.head_dim + d) for d in range(s.head_dim)]
            fused += [(1, g * s.head_dim + d) for d in range(s.head_dim)]
            fused += [(2, g * s.head_dim + d) for d in range(s.head_dim)]
        size = len(fused) // self.tp
        mine = fused[self.rank * size : (self.rank + 1) * size]
        rows = tuple(torch.tensor([row for part, row in mine if part == p], dtype=torch.int64) for p in range(3))
        cat_position = {}
        for p in range(3):
            offset = sum(len(rows[q]) for q in range(p))
            for i, row in enumerate(rows[p].tolist()):
                cat_position[(p, row)] = offset + i
        order = torch.tensor([cat_position[item] for item in mine], dtype=torch.int64)
        return ColumnShard(ATTN_PARTS, rows, None if torch.equal(order, torch.arange(len(mine))) else order)


def gather_rows(shard: ColumnShard, tensors: list[torch.Tensor]) -> torch.Tensor:
    """This rank's fused rows of a column-parallel weight (or bias) from the HF per-part tensors."""
    local = torch.cat([t[rows] for t, rows in zip(tensors, shard.rows)], dim=0)
    return local if shard.order is None else local[shard.order]


def build_gpt(shape: ModelShape, tp: int, dtype: torch.dtype, device: torch.device) -> Any:
    """An uninitialised GPTModel (megatron-core local layer spec) for `shape`, frozen, on `device`."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    s = shape
    config = TransformerConfig(
        num_layers=s.layers,
        hidden_size=s.hidden,
        num_attention_heads=s.heads,
        num_query_groups=s.kv_heads,
        kv_channels=s.head_dim,
        ffn_hidden_size=s.ffn,
        normalization="RMSNorm",
        layernorm_epsilon=s.eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=s.qkv_bias,
        qk_layernorm=s.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=device.type == "cpu",
        perform_initialization=False,  # every weight is overwritten by the HF one
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(qk_layernorm=s.qk_norm, normalization="RMSNorm"),
        vocab_size=s.vocab,
        max_sequence_length=max(s.max_len, 1),
        parallel_output=True,  # logits stay vocab-parallel; backends.megatron_rank takes the log-softmax across ranks
        share_embeddings_and_output_weights=s.tied,
        position_embedding_type="rope",
        rotary_base=int(s.rope_theta) if s.rope_theta.is_integer() else s.rope_theta,  # type: ignore[arg-type]
        rope_scaling=s.rope_scaling_factor is not None,
        rope_scaling_factor=s.rope_scaling_factor or 8.0,
    )
    return model.to(device).requires_grad_(False).eval()


class HFWeights:
    """Reads tensors of a local HF model directory by name, one at a time (safetensors, possibly sharded)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: self.path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            from safetensors import safe_open

            self.files = {}
            for file in sorted(self.path.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as handle:
                    self.files.update({k: file for k in handle.keys()})  # noqa: SIM118 - not a dict
        if not self.files:
            raise UserError(f"base_model: no safetensors weights in {self.path}")

    def has(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self.files:
            raise UserError(f"base_model: weight {key!r} missing from {self.path}")
        with safe_open(str(self.files[key]), framework="pt") as handle:
            return handle.get_tensor(key)


def load_hf_weights(model: Any, shape: ModelShape, layout: Layout, weights: HFWeights) -> None:
    """Copy this rank's slice of every HF weight into the GPTModel (strict: every megatron weight is set once)."""
    s = shape
    state: dict[str, torch.Tensor] = {}
    vocab_rows = layout.vocab.rows[0]
    state["embedding.word_embeddings.weight"] = weights.get("model.embed_tokens.weight")[vocab_rows]
    if not s.tied:
        key = "lm_head.weight" if weights.has("lm_head.weight") else "model.embed_tokens.weight"
        state["output_layer.weight"] = weights.get(key)[vocab_rows]
    state["decoder.final_layernorm.weight"] = weights.get("model.norm.weight")
    for i in range(s.layers):
        hf, mg = HF_LAYER.format(i=i), f"decoder.layers.{i}"
        get: Callable[[str], torch.Tensor] = lambda name, hf=hf: weights.get(f"{hf}.{name}")
        state[f"{mg}.input_layernorm.weight"] = get("input_layernorm.weight")
        state[f"{mg}.self_attention.linear_qkv.weight"] = gather_rows(
            layout.qkv, [get(f"self_attn.{p}.weight") for p in ATTN_PARTS]
        )
        if s.qkv_bias:
            state[f"{mg}.self_attention.linear_qkv.bias"] = gather_rows(
                layout.qkv, [get(f"self_attn.{p}.bias") for p in ATTN_PARTS]
            )
        if s.qk_norm:
            state[f"{mg}.self_attention.q_layernorm.weight"] = get("self_attn.q_norm.weight")
            state[f"{mg}.self_attention.k_layernorm.weight"] = get("self_attn.k_norm.weight")
        state[f"{mg}.self_attention.linear_proj.weight"] = get("self_attn.o_proj.weight")[:, layout.proj_cols]
        state[f"{mg}.pre_mlp_layernorm.weight"] = get("post_attention_layernorm.weight")
        state[f"{mg}.mlp.linear_fc1.weight"] = gather_rows(layout.fc1, [get(f"mlp.{p}.weight") for p in MLP_PARTS])
        state[f"{mg}.mlp.linear_fc2.weight"] = get("mlp.down_proj.weight")[:, layout.fc2_cols]
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise RuntimeError(
            f"megatron conversion out of step with GPTModel: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    with torch.no_grad():
        for key, param in params.items():
            value = state[key]
            if tuple(value.shape) != tuple(param.shape):
                raise RuntimeError(
                    f"megatron conversion: {key} is {tuple(value.shape)}, GPTModel wants {tuple(param.shape)}"
                )
            param.copy_(value.to(param.dtype))
