"""Custom losses uploaded as graphs (SDK `create_custom_loss`): rebuilt from the server's own table of operations
and run per datum by torch.fx's Interpreter, then summed, as the SDK's client-side `run_loss_handle` does.

Nothing from the upload runs as code: every call target comes from the table below (the names core/loss_graph.py
allows, looked up here), every argument is data, and each node's result is checked before the next runs.
"""

from __future__ import annotations

import builtins
import math
import operator
from typing import Any

import torch
import torch.fx
from torch import Tensor

from core import loss_graph
from core.errors import UserError

_ROOTS: dict[str, Any] = {"torch": torch, "math": math, "operator": operator}
# A node's tensor may hold at most this many times the elements of the datum's largest input (plus a floor), so a
# loss cannot broadcast its way to a T x T tensor and keep going.
GROWTH_LIMIT = 16
MIN_ELEMENTS = 1 << 16
_TO_KWARGS = frozenset({"dtype", "copy", "non_blocking"})


def _resolve(name: str) -> Any:
    """The object an allowed wire name stands for (names come from core.loss_graph, never from an upload)."""
    if name == "getattr":
        return builtins.getattr
    root, *path = name.split(".")
    value = _ROOTS[root]
    for part in path:
        value = getattr(value, part)
    return value


FUNCTIONS: dict[str, Any] = {name: _resolve(name) for name in sorted(loss_graph.FUNCTIONS)}


def _decode(value: Any, env: dict[str, torch.fx.Node]) -> Any:
    """A checked argument (core.loss_graph._check_arg) as the Python value or fx node it stands for."""
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if not isinstance(value, dict):
        return value
    ((kind, inner),) = value.items()
    if kind == "ref":
        return env[inner]
    if kind == "tuple":
        return tuple(_decode(v, env) for v in inner)
    if kind == "dict":
        return {k: _decode(v, env) for k, v in inner.items()}
    if kind == "slice":
        return slice(*(_decode(v, env) for v in inner))
    if kind == "ellipsis":
        return Ellipsis
    if kind == "float":
        return float(inner)
    if kind in ("dtype", "memory_format"):
        return getattr(torch, inner)
    raise AssertionError(f"unchecked argument kind {kind!r}")  # core.loss_graph refuses every other kind


class _Runner(torch.fx.Interpreter):
    """Interprets one rebuilt graph; calls on tensors only, and no node grows past the datum's element budget."""

    def __init__(self, graph: torch.fx.Graph, loss: GraphLoss) -> None:
        super().__init__(torch.nn.Module(), graph=graph)
        self.loss = loss
        self.max_elements = MIN_ELEMENTS

    def run_node(self, n: torch.fx.Node) -> Any:
        wire = self.loss.wire_names.get(n, n.name)
        try:
            value = super().run_node(n)
        except UserError:
            raise
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 -- the user's graph: any failure is theirs, named by node
            raise UserError(
                f"custom loss {self.loss.name!r}: node {wire} ({n.op} {n.target if isinstance(n.target, str) else ''}"
                f"{getattr(n.target, '__name__', '')}) raised {type(exc).__name__}: {exc}"
            ) from None
        if isinstance(value, Tensor) and value.numel() > self.max_elements:
            raise UserError(
                f"custom loss {self.loss.name!r}: node {wire} made a tensor of shape {tuple(value.shape)}, more than "
                f"{GROWTH_LIMIT}x the elements of the datum's largest input"
            )
        return value

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if target is builtins.getattr and not isinstance(args[0], Tensor):
            raise TypeError(f"getattr on a {type(args[0]).__name__}; only a tensor's attributes can be read")
        return super().call_function(target, args, kwargs)

    def call_method(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if not isinstance(args[0], Tensor):
            raise TypeError(f"method {target!r} called on a {type(args[0]).__name__}, not a tensor")
        if target == "to" and (not all(isinstance(a, torch.dtype) for a in args[1:]) or not set(kwargs) <= _TO_KWARGS):
            raise TypeError("to() may only change the dtype; the server decides the device")
        return super().call_method(target, args, kwargs)


class GraphLoss:
    """A LossFn (losses/registry.py) made from a checked upload: per datum fn(logprobs, *inputs) -> (loss,
    metrics); losses are summed in datum order, metrics summed (custom/x:sum) or averaged over datums (:mean)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.name: str = spec["name"]
        self.inputs: list[dict[str, Any]] = spec["inputs"]
        self.graph = torch.fx.Graph()
        self.wire_names: dict[torch.fx.Node, str] = {}
        env: dict[str, torch.fx.Node] = {}
        for node in spec["nodes"]:
            args = tuple(_decode(a, env) for a in node["args"])
            kwargs = {k: _decode(v, env) for k, v in node["kwargs"].items()}
            op, target = node["op"], node["target"]
            if op == "placeholder":
                made = self.graph.placeholder(target)
            elif op == "call_function":
                made = self.graph.call_function(FUNCTIONS[target], args, kwargs)
            elif op == "call_method":
                made = self.graph.call_method(target, args, kwargs)
            else:  # output, the last node (core.loss_graph)
                made = self.graph.output(args[0])
            env[node["name"]] = made
            self.wire_names[made] = node["name"]
        self.graph.lint()
        self.__doc__ = f"custom loss {self.name!r}, uploaded as a graph of {len(spec['nodes'])} nodes"

    def __call__(
        self, target_logprobs: list[Tensor], loss_fn_inputs: list[dict[str, Tensor]], config: dict[str, Any]
    ) -> tuple[Tensor, dict[str, float]]:
        runner = _Runner(self.graph, self)
        total: Tensor | None = None
        sums: dict[str, float] = {}
        for i, (logprobs, datum) in enumerate(zip(target_logprobs, loss_fn_inputs)):  # logprobs: (N,) or (N, K)
            values = [logprobs, *(self._input(i, datum, spec) for spec in self.inputs[1:])]
            self._check_rank(i, "target_tokens", logprobs, self.inputs[0])
            runner.max_elements = max(MIN_ELEMENTS, GROWTH_LIMIT * max(v.numel() for v in values))
            out = runner.run(*values)
            loss, metrics = out
            if not (isinstance(loss, Tensor) and loss.dim() == 0 and loss.is_floating_point()):
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise UserError(f"custom loss {self.name!r}: datum {i}: the loss must be a float scalar, got {shape}")
            total = loss if total is None else total + loss  # the SDK's order: datum 0 + datum 1 + ...
            for key, value in metrics.items():
                if not isinstance(value, Tensor) or value.numel() != 1:
                    raise UserError(
                        f"custom loss {self.name!r}: datum {i}: metric {key!r} must be a one-element tensor"
                    )
                sums[key] = sums.get(key, 0.0) + float(value.detach().item())
        assert total is not None  # compute_loss refuses an empty batch
        count = len(target_logprobs)
        return total, {key: value / count if key.endswith(":mean") else value for key, value in sums.items()}

    def _input(self, i: int, datum: dict[str, Tensor], spec: dict[str, Any]) -> Tensor:
        name = spec["name"]
        if name not in datum:
            raise UserError(f"loss_fn_inputs[{i}].{name}: required by custom loss {self.name!r}")
        value = datum[name]
        self._check_rank(i, name, value, spec)
        return value

    def _check_rank(self, i: int, key: str, value: Tensor, spec: dict[str, Any]) -> None:
        if value.dim() != spec["rank"]:
            raise UserError(
                f"loss_fn_inputs[{i}].{key}: rank {value.dim()} (shape {tuple(value.shape)}), but custom loss "
                f"{self.name!r} declared {spec['name']} with rank {spec['rank']}"
            )
