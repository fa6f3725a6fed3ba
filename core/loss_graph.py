"""A traced custom loss as the SDK uploads it (tinker CustomLossGraph, format 1), checked without torch.

The API checks an upload here before storing it, and a worker checks it again before rebuilding it
(losses/graph.py): only the operations named below exist on the server, every argument is plain data, and every
failure is a UserError naming the node. Nothing here runs anything.
"""

from __future__ import annotations

import math
import re
from typing import Any

from core.errors import UserError

FORMAT = 1
MAX_INPUTS = 16  # logprobs included, as the SDK allows
MAX_ARG_DEPTH = 8
MAX_ARG_ITEMS = 64  # items in one list, tuple or dict argument
MAX_STRING = 64  # a string argument (getattr's attribute, a reduction name)
GRAPH_KEY = "tb:lossgraph:{owner}:{loss_id}"  # JSON {name, inputs, graph, session_id, created}, per API key
GRAPHS_KEY = "tb:lossgraphs:{owner}"  # zset loss_id -> created: what one key has stored
LOSS_ID_PREFIX = "graph:"  # a dill-uploaded loss's name can hold no ':' (api/custom_losses.NAME_RE)

NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")  # the SDK's rule for loss parameters
METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")  # the SDK's rule


def _words(text: str) -> list[str]:
    return text.split()


# Pure tensor math whose result is no larger than its inputs or their broadcast: nothing that takes a size
# (zeros, arange, expand, repeat), reads or writes outside torch, changes a tensor in place, or leaves the graph.
_TENSOR_MATH = _words(
    "abs neg exp exp2 expm1 log log1p log2 log10 sigmoid logit tanh relu sqrt rsqrt square reciprocal pow sign "
    "floor ceil round trunc frac clamp clip clamp_min clamp_max minimum maximum fmin fmax where sum nansum mean "
    "nanmean prod amax amin max min logsumexp cumsum cumprod softmax log_softmax std var norm dot gather "
    "take_along_dim index_select masked_fill isfinite isnan isinf logical_and logical_or logical_not logical_xor "
    "lt le gt ge eq ne add sub mul div true_divide floor_divide remainder fmod flatten reshape squeeze unsqueeze "
    "transpose t narrow select detach nan_to_num argmax argmin sort topk any all count_nonzero diff flip roll "
    "lerp xlogy logaddexp sinh cosh atan sin cos"
)
_TORCH_ONLY = _words("stack cat zeros_like ones_like full_like numel cosine_similarity")
_FUNCTIONAL = _words(
    "log_softmax softmax relu silu elu leaky_relu kl_div mse_loss l1_loss smooth_l1_loss huber_loss "
    "binary_cross_entropy_with_logits cross_entropy nll_loss normalize sigmoid tanh"
)
_C_NN = _words("log_sigmoid softplus gelu")  # torch.nn.functional's logsigmoid, softplus, gelu are these
_MATH = _words("sqrt exp log log1p expm1 log2 log10 pow floor ceil fabs tanh isfinite isnan isinf")
_OPERATOR = _words(
    "add sub mul truediv floordiv mod pow neg pos abs getitem lt le gt ge eq ne and_ or_ xor invert not_"
)

# call_function targets, by the name the SDK sends (torch.fx's qualified name; Python operators as operator.*).
FUNCTIONS = frozenset(
    [f"torch.{name}" for name in _TENSOR_MATH + _TORCH_ONLY if name != "norm"]
    + ["torch.functional.norm"]  # torch.norm is defined in torch.functional
    + [f"torch.nn.functional.{name}" for name in _FUNCTIONAL]
    + [f"torch._C._nn.{name}" for name in _C_NN]
    + [f"math.{name}" for name in _MATH]
    + [f"operator.{name}" for name in _OPERATOR]
    + ["getattr"]
)
# call_method targets: torch.Tensor methods, called on a tensor only (checked when the graph runs).
METHODS = frozenset(
    _TENSOR_MATH
    + _words("float double long int bool to type_as size dim numel contiguous clone view view_as reshape_as expand_as")
)
ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "T", "mT"})  # what getattr may read, on a tensor only
DTYPES = frozenset({"float32", "float64", "float16", "bfloat16", "int64", "int32", "bool"})
MEMORY_FORMATS = frozenset({"contiguous_format", "preserve_format"})
_REFUSED_OPS = {
    "get_attr": "reads a captured tensor; a custom loss may only read logprobs and the loss_fn_inputs it names",
    "call_module": "calls a torch.nn module; custom losses use functions such as torch.nn.functional only",
}


def loss_id_of(digest: str) -> str:
    """The id api/ answers for an uploaded graph (a content hash, so a re-sent upload gets the same id)."""
    return f"{LOSS_ID_PREFIX}{digest[:32]}"


def is_graph_loss_id(loss_id: Any) -> bool:
    return isinstance(loss_id, str) and loss_id.startswith(LOSS_ID_PREFIX)


def check_upload(name: Any, inputs: Any, graph: Any, max_nodes: int) -> dict[str, Any]:
    """The upload as plain, checked data: {name, inputs: [{name, rank}], nodes: [...]}.

    UserError naming the field or node for anything the server does not run: an unknown op, function, method or
    attribute, a node referring to one not defined before it, more than max_nodes nodes, ranks other than the SDK's
    (logprobs 1 or 2, inputs 1 or 2; rank-0 inputs cannot cross the protobuf wire, see CUSTOM_LOSS_GUIDE.md).
    """
    if not isinstance(name, str) or not 0 < len(name) <= 128:
        raise UserError(f"name: must be the loss function's name, 1-128 characters, got {name!r:.80}")
    checked_inputs = _check_inputs(inputs)
    if not isinstance(graph, dict):
        raise UserError("graph: must be a CustomLossGraph object {format, nodes}")
    if graph.get("format", FORMAT) != FORMAT:
        raise UserError(f"graph.format: this server reads format {FORMAT}, got {graph.get('format')!r:.40}")
    nodes = graph.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise UserError("graph.nodes: must be a non-empty list of nodes")
    if len(nodes) > max_nodes:
        raise UserError(
            f"graph.nodes: {len(nodes)} nodes is more than the limit of {max_nodes} (TINKERBELL_LOSS_GRAPH_MAX_NODES)"
        )
    defined: set[str] = set()
    checked_nodes = []
    placeholders = 0
    for i, node in enumerate(nodes):
        where = f"graph.nodes[{i}]"
        if not isinstance(node, dict):
            raise UserError(f"{where}: must be an object {{op, name, target, args, kwargs}}")
        node_name = node.get("name")
        if not isinstance(node_name, str) or not NODE_NAME.fullmatch(node_name):
            raise UserError(f"{where}.name: must be an identifier of at most 128 characters, got {node_name!r:.80}")
        where = f"graph.nodes[{i}] ({node_name})"
        if node_name in defined:
            raise UserError(f"{where}: a second node with this name")
        op, target = node.get("op"), node.get("target")
        if not isinstance(op, str):
            raise UserError(f"{where}.op: must be a torch.fx node kind (placeholder, call_function, ...)")
        if not isinstance(target, str):
            raise UserError(f"{where}.target: must be a string")
        args, kwargs = node.get("args", []), node.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise UserError(f"{where}: args must be a list and kwargs an object")
        if op in ("call_function", "call_method") and placeholders < len(checked_inputs):
            raise UserError(f"{where}: an operation before every declared input has its placeholder")
        if op == "placeholder":
            if placeholders >= len(checked_inputs) or i != placeholders:
                raise UserError(
                    f"{where}: placeholder {target!r:.64} beyond the {len(checked_inputs)} declared inputs, or after "
                    "other nodes"
                )
            expected = checked_inputs[placeholders]["name"]
            if target != expected:
                raise UserError(f"{where}: placeholder {target!r:.64} where input {placeholders} is {expected!r}")
            if args or kwargs:
                raise UserError(f"{where}: a placeholder takes no arguments (defaults are not supported)")
            placeholders += 1
        elif op == "call_function":
            if target not in FUNCTIONS:
                raise UserError(
                    f"{where}: calls {target!r:.80}, which is not among the operations this server runs (torch, "
                    "torch.nn.functional, math and operator functions that only compute; see CUSTOM_LOSS_GUIDE.md)"
                )
            if target == "getattr":
                _check_getattr(where, args, kwargs)
        elif op == "call_method":
            if target not in METHODS:
                raise UserError(
                    f"{where}: calls method {target!r:.80}, which is not among the tensor methods this server runs "
                    "(no in-place methods, nothing that leaves torch; see CUSTOM_LOSS_GUIDE.md)"
                )
            if not args:
                raise UserError(f"{where}: a method call needs the tensor it is called on")
        elif op == "output":
            if i != len(nodes) - 1:
                raise UserError(f"{where}: the output node must be the last node")
            _check_output(where, args, kwargs, defined)
        elif op in _REFUSED_OPS:
            raise UserError(f"{where}: op {op!r} {_REFUSED_OPS[op]}")
        else:
            raise UserError(f"{where}.op: {op!r:.40} is not a torch.fx node kind")
        checked_nodes.append(
            {
                "op": op,
                "name": node_name,
                "target": target,
                "args": [_check_arg(f"{where}.args[{j}]", a, defined, 0) for j, a in enumerate(args)],
                "kwargs": {
                    _kwarg_name(where, k): _check_arg(f"{where}.kwargs.{k}", v, defined, 0) for k, v in kwargs.items()
                },
            }
        )
        defined.add(node_name)
    if checked_nodes[-1]["op"] != "output":
        raise UserError("graph.nodes: the last node must be the output node")
    return {"name": name, "inputs": checked_inputs, "nodes": checked_nodes}


def _check_inputs(inputs: Any) -> list[dict[str, Any]]:
    if not isinstance(inputs, list) or not inputs:
        raise UserError("inputs: must list the loss's inputs, logprobs first, each {name, rank}")
    if len(inputs) > MAX_INPUTS:
        raise UserError(f"inputs: {len(inputs)} inputs is more than {MAX_INPUTS}, logprobs included")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(item, dict):
            raise UserError(f"{where}: must be an object {{name, rank}}")
        name, rank = item.get("name"), item.get("rank")
        if not isinstance(name, str) or not INPUT_NAME.fullmatch(name):
            raise UserError(f"{where}.name: must be a lowercase identifier, got {name!r:.80}")
        if any(seen["name"] == name for seen in out):
            raise UserError(f"{where}.name: {name!r} is declared twice")
        if i == 0 and name != "logprobs":
            raise UserError(f"{where}.name: the first input must be logprobs, got {name!r}")
        if i > 0 and name == "target_tokens":
            raise UserError(f"{where}.name: target_tokens is what logprobs are taken of, not an input of the loss")
        if isinstance(rank, bool) or rank not in (0, 1, 2):
            raise UserError(f"{where}.rank: must be 0, 1 or 2, got {rank!r:.40}")
        if rank == 0:
            raise UserError(
                f"{where}.rank: {name} is declared rank 0 (a scalar); this server takes per-token inputs only "
                "(rank 1 [T] or 2 [T, K]), because the protobuf wire cannot tell a scalar from one value: put the "
                "constant in the loss function itself, or pass it once per token"
            )
        out.append({"name": name, "rank": rank})
    return out


def _kwarg_name(where: str, key: Any) -> str:
    if not isinstance(key, str) or not NODE_NAME.fullmatch(key):
        raise UserError(f"{where}.kwargs: {key!r:.80} is not a keyword argument name")
    return key


def _check_getattr(where: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    if len(args) != 2 or kwargs or not isinstance(args[1], str) or args[1] not in ATTRIBUTES:
        attribute = args[1] if len(args) == 2 else None
        raise UserError(
            f"{where}: reads attribute {attribute!r:.64}; a custom loss may read only {', '.join(sorted(ATTRIBUTES))} "
            "of a tensor"
        )


def _check_output(where: str, args: list[Any], kwargs: dict[str, Any], defined: set[str]) -> None:
    value = args[0] if len(args) == 1 and not kwargs else None
    items = value.get("tuple") if isinstance(value, dict) and set(value) == {"tuple"} else value
    if not isinstance(items, list) or len(items) != 2:
        raise UserError(f"{where}: the loss must return (loss, metrics)")
    loss, metrics = items
    if not _is_ref(loss, defined):
        raise UserError(f"{where}: the loss it returns must be a tensor computed by the graph")
    if not (isinstance(metrics, dict) and set(metrics) == {"dict"} and isinstance(metrics["dict"], dict)):
        raise UserError(f"{where}: the metrics it returns must be a dict of tensors")
    for key, ref in metrics["dict"].items():
        if not (isinstance(key, str) and METRIC_KEY.fullmatch(key)):
            raise UserError(f"{where}: metric {key!r:.80} must be named custom/<name>:sum or custom/<name>:mean")
        if not _is_ref(ref, defined):
            raise UserError(f"{where}: metric {key!r} must be a tensor computed by the graph")


def _is_ref(value: Any, defined: set[str]) -> bool:
    return (
        isinstance(value, dict) and set(value) == {"ref"} and isinstance(value["ref"], str) and value["ref"] in defined
    )


def _check_arg(where: str, value: Any, defined: set[str], depth: int) -> Any:
    """One encoded argument (tinker CustomLossNode.args), returned as checked plain data."""
    if depth > MAX_ARG_DEPTH:
        raise UserError(f"{where}: arguments nested more than {MAX_ARG_DEPTH} deep")
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UserError(f"{where}: a non-finite float must be sent as {{'float': 'inf'}}")
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise UserError(f"{where}: a string argument longer than {MAX_STRING} characters")
        return value
    if isinstance(value, list):
        return [_check_arg(f"{where}[{i}]", v, defined, depth + 1) for i, v in enumerate(_items(where, value))]
    if not isinstance(value, dict) or len(value) != 1:
        raise UserError(f"{where}: not an encoded argument (a number, string, list or one-key object)")
    ((kind, inner),) = value.items()
    if kind == "ref":
        if not isinstance(inner, str) or inner not in defined:
            raise UserError(f"{where}: refers to {inner!r:.80}, which is not a node defined before this one")
        return value
    if kind == "tuple" and isinstance(inner, list):
        return {
            "tuple": [_check_arg(f"{where}[{i}]", v, defined, depth + 1) for i, v in enumerate(_items(where, inner))]
        }
    if kind == "dict" and isinstance(inner, dict):
        for key in _items(where, list(inner)):
            if not isinstance(key, str) or len(key) > 2 * MAX_STRING:
                raise UserError(
                    f"{where}: dict key {key!r:.80} must be a string of at most {2 * MAX_STRING} characters"
                )
        return {"dict": {k: _check_arg(f"{where}.{k}", v, defined, depth + 1) for k, v in inner.items()}}
    if kind == "slice" and isinstance(inner, list) and len(inner) == 3:
        parts = [_check_arg(f"{where}.slice[{i}]", v, defined, depth + 1) for i, v in enumerate(inner)]
        if not all(p is None or isinstance(p, int) or (isinstance(p, dict) and "ref" in p) for p in parts):
            raise UserError(f"{where}: slice bounds must be integers, None or nodes")
        return {"slice": parts}
    if kind == "ellipsis" and inner is True:
        return value
    if kind == "float" and inner in ("inf", "-inf", "nan"):
        return value
    if kind == "dtype" and inner in DTYPES:
        return value
    if kind == "memory_format" and inner in MEMORY_FORMATS:
        return value
    if kind in ("device", "layout"):
        raise UserError(f"{where}: a {kind} argument; the server decides where and how a loss runs")
    raise UserError(f"{where}: {kind!r:.40} {inner!r:.40} is not an argument this server reads")


def _items(where: str, items: list[Any]) -> list[Any]:
    if len(items) > MAX_ARG_ITEMS:
        raise UserError(f"{where}: more than {MAX_ARG_ITEMS} items in one argument")
    return items
