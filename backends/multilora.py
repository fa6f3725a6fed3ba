"""Our multi-LoRA layer: one frozen base nn.Linear plus any number of named adapters, each applied to its own rows.

Which rows belong to which adapter is a `Route`, set per forward by the caller (LoadedBase.routed / routed_tokens).

Measured (CPU, torch 2.13, shared 2-core box, best of 5-8; x (1024, 576) -> (1024, 1536), 8 adapters x 128 rows,
rank 32; fwd+bwd / fwd): base linear alone 30.6 / 14.0 ms; segment loop 44-47 / 18-20 ms; torch.bmm on equal
segments 42.0 / 18.7 ms; torch._grouped_mm 40.0 / 18.3 ms (runs on CPU, but its backward rejects the expanded
gradient of a plain .sum()). In-place `out[s:e] += delta` is 35.6 vs 21.6 ms for index_add_ (CopySlices clones the
whole gradient per slice), and in the real model index_add_ into the (B*T, 49152) lm_head output spent 4 s of a 6 s
pass in scatter/gather, so the loop writes its deltas with one torch.cat and one add (`_lay_out`).
We keep the segment loop: within ~10 % of bmm/grouped_mm on equal segments, and it needs no padding of unequal
segments or unequal ranks (bmm/grouped_mm need both), nor stacked copies of every adapter's A and B per layer.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

# Llama / Qwen style module names that can carry LoRA (Tinker's train_attn, train_mlp, train_unembed).
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
MAX_PADDING = 0.10  # pack_rows widens rows (up to 2x the longest datum) until padding is at most this fraction


@dataclass
class LoraWeights:
    lora_A: nn.Parameter  # (r, in) float32
    lora_B: nn.Parameter  # (out, r) float32
    scale: float  # alpha / r


@dataclass(frozen=True)
class Group:
    """One adapter's rows: `runs`, its contiguous [start, end) ranges in the order the caller listed them, and
    `index` (n,) int64 on the device to gather them when there is more than one run (one run is sliced)."""

    name: str
    runs: tuple[tuple[int, int], ...]
    index: torch.Tensor | None


@dataclass(frozen=True)
class Route:
    """tokens=False: groups index dim 0 of a (B, T, H) input, `extent` = B exactly.
    tokens=True: groups index the flattened (B*T) positions, `extent` = one past the last routed position."""

    tokens: bool
    extent: int
    groups: tuple[Group, ...]


class Routing(threading.local):
    """The route of the forward running in this thread, shared by every MultiLoraLinear of one model."""

    route: Route | None = None


def _group(name: str, ranges: list[tuple[int, int]], device: torch.device) -> Group:
    runs: list[tuple[int, int]] = []
    for start, end in ranges:
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    index = torch.cat([torch.arange(a, b) for a, b in runs]).to(device) if len(runs) > 1 else None
    return Group(name, tuple(runs), index)


def rows_route(rows: Sequence[str | None], device: torch.device) -> Route:
    """Adapter name per batch row (None: base model only); rows need not be sorted."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for row, name in enumerate(rows):
        if name is not None:
            ranges.setdefault(name, []).append((row, row + 1))
    groups = tuple(_group(name, spans, device) for name, spans in ranges.items())
    return Route(tokens=False, extent=len(rows), groups=groups)


def tokens_route(segments: Sequence[tuple[str | None, int, int]], device: torch.device) -> Route:
    """Adapter per [start, end) range of flattened positions. An adapter's positions keep the order of its segments
    (so its LoRA matmuls see its tokens in the same order however the batch was packed)."""
    covered = sorted((start, end) for name, start, end in segments if name is not None)
    for (s0, e0), (s1, e1) in itertools.pairwise(covered):
        if s1 < e0:
            raise ValueError(f"routed_tokens: segments [{s0}, {e0}) and [{s1}, {e1}) overlap")
    if covered and (covered[0][0] < 0 or any(e <= s for s, e in covered)):
        raise ValueError("routed_tokens: segments need 0 <= start < end")
    ranges: dict[str, list[tuple[int, int]]] = {}
    for name, start, end in segments:
        if name is not None:
            ranges.setdefault(name, []).append((int(start), int(end)))
    groups = tuple(_group(name, spans, device) for name, spans in ranges.items())
    return Route(tokens=True, extent=max((e for _, e in covered), default=0), groups=groups)


class MultiLoraLinear(nn.Module):
    """A frozen `base_layer` (nn.Linear) plus named LoRA adapters; the current Route says whose rows are whose.

    out = base(x) for every row, then out[rows of a] += (x[rows of a] · Aᵀ · Bᵀ) · scale for each routed adapter a.
    Adapters live in a plain dict (not registered): the model's parameters stay the frozen base ones.
    """

    def __init__(self, base_layer: nn.Linear, routing: Routing) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.adapters: dict[str, LoraWeights] = {}
        self.routing = routing

    @property
    def weight(self) -> torch.Tensor:  # HF code that reads lm_head.weight (tied embeddings) still finds it
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def new_adapter(self, name: str, rank: int, alpha: float, device: torch.device) -> LoraWeights:
        """Fresh weights consuming the CPU RNG exactly as PEFT's LoraLayer.update_layer does: nn.Linear(in, r) and
        nn.Linear(r, out) constructors (one kaiming_uniform each), then reset_lora_parameters (A again, B = 0)."""
        lora_a = nn.init.kaiming_uniform_(torch.empty(rank, self.in_features), a=math.sqrt(5))  # (r, in)
        lora_b = nn.init.kaiming_uniform_(torch.empty(self.out_features, rank), a=math.sqrt(5))  # (out, r)
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        nn.init.zeros_(lora_b)
        weights = LoraWeights(nn.Parameter(lora_a.to(device)), nn.Parameter(lora_b.to(device)), alpha / rank)
        self.adapters[name] = weights
        return weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.routing.route
        active = [(g, self.adapters[g.name]) for g in route.groups if g.name in self.adapters] if route else []
        if not active:
            return self.base_layer(x)  # (..., out): no adapter here, no extra cost
        assert route is not None
        shape = x.shape
        if route.tokens:
            x = x.reshape(-1, shape[-1])  # (B*T, in)
            if x.shape[0] < route.extent:
                raise RuntimeError(f"routed_tokens: {route.extent} positions routed, the input has {x.shape[0]}")
        elif x.shape[0] != route.extent:
            raise RuntimeError(f"routed: {route.extent} rows routed, the input has batch size {x.shape[0]}")
        out = self.base_layer(x)  # (B*T, out) or (B, T, out)
        cast = not torch.is_autocast_enabled(x.device.type)
        tiled = _tiles(active, x.shape[0])  # x.shape[0]: B*T positions (tokens route) or B rows (rows route)
        if tiled is not None:
            flat = x.reshape(-1, shape[-1])  # (B*T, in)
            delta = _stacked(flat, tiled, cast).to(out.dtype).view(out.shape)
            return (out + delta).view(*shape[:-1], self.out_features)
        pieces: list[tuple[int, torch.Tensor]] = []  # (first row, delta rows), to be laid out in row order
        for group, lora in active:
            if group.index is None:
                rows = x[group.runs[0][0] : group.runs[0][1]]  # (n, [T,] in), a view
            else:
                rows = x.index_select(0, group.index)  # (n, [T,] in)
            if cast:
                rows = rows.to(lora.lora_A.dtype)  # bf16 base without autocast: LoRA in float32
            # scale on the (n, r) intermediate: r wide instead of out wide, and the same order as _stacked
            delta = nn.functional.linear(nn.functional.linear(rows, lora.lora_A) * lora.scale, lora.lora_B)
            delta = delta.to(out.dtype)  # (n, [T,] out)
            pieces += zip((a for a, _ in group.runs), delta.split([b - a for a, b in group.runs]))
        return (out + _lay_out(pieces, out)).view(*shape[:-1], self.out_features)


def _tiles(active: list[tuple[Group, LoraWeights]], rows: int) -> list[LoraWeights] | None:
    """The adapters in row order when their rows tile [0, rows) in equal contiguous runs and they share one rank
    (equal-length datums, one request per adapter: the common packed pass; equal rows per adapter in a decode
    step); else None."""
    spans = sorted((g.runs[0], lora) for g, lora in active if len(g.runs) == 1)
    if len(spans) != len(active) or len(spans) < 2:
        return None
    length, rank = spans[0][0][1] - spans[0][0][0], spans[0][1].lora_A.shape[0]
    for i, ((start, end), lora) in enumerate(spans):
        if start != i * length or end - start != length or lora.lora_A.shape[0] != rank:
            return None
    return [lora for _, lora in spans] if length * len(spans) == rows else None


def _stacked(x: torch.Tensor, adapters: list[LoraWeights], cast: bool) -> torch.Tensor:
    """Every adapter's LoRA on its own equal run of rows with two bmm's: a constant number of ops whatever the
    number of adapters (the segment loop makes three per adapter, each paying a thread-pool round trip on a CPU)."""
    k, rows = len(adapters), x.shape[0]
    xs = x.view(k, rows // k, x.shape[-1])  # (k, L, in)
    if cast:
        xs = xs.to(adapters[0].lora_A.dtype)
    a = torch.stack([lora.lora_A for lora in adapters])  # (k, r, in)
    b = torch.stack([lora.lora_B for lora in adapters])  # (k, out, r)
    scale = torch.tensor([lora.scale for lora in adapters], dtype=a.dtype, device=a.device).view(k, 1, 1)
    h = torch.bmm(xs, a.transpose(1, 2)) * scale  # (k, L, r)
    return torch.bmm(h, b.transpose(1, 2)).view(rows, -1)  # (k*L, out)


def _lay_out(pieces: list[tuple[int, torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
    """Deltas at their rows, zeros elsewhere, as one tensor shaped like `like`.

    One torch.cat, then one add: index_add_ into the (B*T, out) output cost a pass over the whole output per
    adapter on CPU (measured 100x slower than this for lm_head with 8 adapters), and in-place adds on slices make
    autograd clone the whole gradient per slice (CopySlices); cat's backward only takes views of the gradient.
    """
    pieces.sort(key=lambda piece: piece[0])
    gaps = [start - (prev_start + len(prev)) for (prev_start, prev), (start, _) in itertools.pairwise(pieces)]
    gaps += [pieces[0][0], like.shape[0] - (pieces[-1][0] + len(pieces[-1][1]))]
    zeros = like.new_zeros((max(gaps), *like.shape[1:]))  # one buffer; gaps are views of it
    parts: list[torch.Tensor] = []
    end = 0
    for start, delta in pieces:
        if start > end:
            parts.append(zeros[: start - end])
        parts.append(delta)
        end = start + len(delta)
    if end < like.shape[0]:
        parts.append(zeros[: like.shape[0] - end])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def inject(model: nn.Module, routing: Routing) -> dict[str, MultiLoraLinear]:
    """Wrap every nn.Linear named like a LoRA target, once, in place. Returns {module path: layer}, in
    named_modules order (the order PEFT visits modules, which fixes the RNG order of initialisation)."""
    found = [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in TARGET_MODULES
    ]
    layers: dict[str, MultiLoraLinear] = {}
    for path, module in found:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = MultiLoraLinear(module, routing)
        setattr(parent, attr, layer)
        layers[path] = layer
    return layers


def matches(path: str, targets: Sequence[str]) -> bool:
    """PEFT's rule for a list of target_modules: the module path equals a target or ends with '.<target>'."""
    return any(path == t or path.endswith(f".{t}") for t in targets)


# ---- packed rows for routed_tokens ----------------------------------------------------------------------------------
def pack_rows(lengths: list[int]) -> tuple[list[list[int]], int]:
    """First-fit-decreasing packing of datum lengths into rows: (rows of datum indices, row width).

    Width starts at the longest datum (attention is quadratic in it) and grows through total/k, up to twice the
    longest, until padding is at most MAX_PADDING of the positions; otherwise the least-padded layout wins.
    """
    longest, total = max(lengths), sum(lengths)
    widths = sorted({longest} | {-(-total // k) for k in range(1, len(lengths) + 1)})
    best: tuple[list[list[int]], int] | None = None
    for width in (w for w in widths if longest <= w <= 2 * longest):
        rows: list[list[int]] = []
        free: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
            if row is None:
                rows.append([])
                free.append(width)
                row = len(rows) - 1
            rows[row].append(i)
            free[row] -= lengths[i]
        if best is None or len(rows) * width < len(best[0]) * best[1]:
            best = (rows, width)
        if total >= (1 - MAX_PADDING) * len(rows) * width:
            return rows, width
    assert best is not None
    return best


@dataclass(frozen=True)
class Packed:
    """Datums packed into rows. position_ids restart at 0 per datum (and are 0 on padding), so with no attention
    mask transformers builds a block-diagonal causal mask: no datum sees another."""

    ids: torch.Tensor  # (B, W) int64; padding is token 0
    position_ids: torch.Tensor  # (B, W) int64
    lengths: list[int]  # per datum
    starts: list[int]  # per datum: its first flattened (B*W) position
    positions: int  # B*W, the positions computed


def pack(tokens: list[torch.Tensor]) -> Packed:
    """Lay (N_i,) token tensors out with pack_rows."""
    lengths = [int(t.numel()) for t in tokens]
    rows, width = pack_rows(lengths)
    ids = torch.zeros((len(rows), width), dtype=torch.int64)  # (B, W)
    position_ids = torch.zeros((len(rows), width), dtype=torch.int64)  # (B, W)
    starts = [0] * len(tokens)
    for r, row in enumerate(rows):
        offset = 0
        for k in row:
            ids[r, offset : offset + lengths[k]] = tokens[k]
            position_ids[r, offset : offset + lengths[k]] = torch.arange(lengths[k])
            starts[k], offset = r * width + offset, offset + lengths[k]
    return Packed(ids, position_ids, lengths, starts, len(rows) * width)
