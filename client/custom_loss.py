"""`@custom_loss(client, name=...)`: serialize a loss with dill (helpers and closures by value) and upload it.

The function comes back unchanged, still callable locally; the service runs it by name on its workers.
"""

from __future__ import annotations

import base64
import dis
import inspect
import sys
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from client.client import TinkerbellClient

F = TypeVar("F", bound=Callable[..., Any])
CONTRACT_ARGS = 3  # model_outputs, loss_fn_inputs, attention_mask; the rest are loss_fn_config keys


def custom_loss(client: TinkerbellClient, name: str | None = None) -> Callable[[F], F]:
    """Decorator: upload the loss to `client`'s service as `name` (default: the function's name).

        @custom_loss(client, name="my_dpo_loss")
        def dpo_loss(model_outputs, loss_fn_inputs, attention_mask, beta=0.1):
            ...
            return LossFnOutput(loss=loss, diagnostics={"accuracy:mean": acc})

    Registering the same name again makes a new version; requests already queued keep the one they were given.
    """

    def decorate(fn: F) -> F:
        client.register_custom_loss(fn, name=name)
        return fn

    return decorate


def serialize_loss(fn: Callable[..., Any], name: str | None = None) -> dict[str, Any]:
    """The /register_custom_loss body for `fn`: base64 dill payload, signature, docstring and source."""
    import dill

    if not callable(fn) or not isinstance(fn, types.FunctionType):
        raise TypeError(f"custom_loss: expected a plain Python function, got {type(fn).__name__}")
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < CONTRACT_ARGS and not any(p.kind == p.VAR_POSITIONAL for p in params):
        raise TypeError(
            f"custom_loss: {fn.__name__} must take (model_outputs, loss_fn_inputs, attention_mask, **config)"
        )
    config = {
        p.name: p.default
        for p in positional[CONTRACT_ARGS:] + [p for p in params if p.kind == p.KEYWORD_ONLY]
        if p.default is not p.empty and _is_json(p.default)
    }
    try:
        lines, first_line = inspect.getsourcelines(fn)
        source = "".join(lines)
    except (OSError, TypeError):
        source, first_line = "", None
    payload = dill.dumps(by_value(fn), recurse=True)
    return {
        "name": name or fn.__name__,
        "code": base64.b64encode(payload).decode(),
        "signature": f"{name or fn.__name__}{inspect.signature(fn)}",
        "docstring": inspect.getdoc(fn) or "",
        "source": source,
        "filename": fn.__code__.co_filename,
        "first_line": first_line,
        "config": config,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def _is_json(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def by_value(fn: types.FunctionType, _memo: dict[int, Any] | None = None) -> types.FunctionType:
    """A copy of `fn` that dill pickles by value, together with the functions from its module it uses.

    dill pickles a function by reference when its module can be imported (a worker would need the user's
    package); a script's __main__ functions already travel by value. Copies get __module__ "__main__" and a
    globals dict holding just the names they use, with same-module functions (helpers) copied the same way.
    Closure cells are rewritten alike. Modules, classes and other objects are left to dill.
    """
    memo = {} if _memo is None else _memo
    if id(fn) in memo:
        return memo[id(fn)]
    module = fn.__module__
    globs: dict[str, Any] = {"__builtins__": fn.__globals__.get("__builtins__", __builtins__), "__name__": "__main__"}
    closure = None
    if fn.__closure__ is not None:
        closure = tuple(types.CellType() for _ in fn.__closure__)
    clone = types.FunctionType(fn.__code__, globs, fn.__name__, fn.__defaults__, closure)
    clone.__kwdefaults__ = fn.__kwdefaults__
    clone.__qualname__ = fn.__qualname__
    clone.__doc__ = fn.__doc__
    clone.__dict__.update(fn.__dict__)
    clone.__module__ = "__main__"
    memo[id(fn)] = clone

    def convert(value: Any) -> Any:
        if isinstance(value, types.FunctionType) and value.__module__ == module and module != "__main__":
            return by_value(value, memo)
        return value

    for global_name in _global_names(fn.__code__):
        if global_name in fn.__globals__:
            globs[global_name] = convert(fn.__globals__[global_name])
    if fn.__closure__ is not None and closure is not None:
        for new, old in zip(closure, fn.__closure__):
            try:
                new.cell_contents = convert(old.cell_contents)
            except ValueError:  # an empty cell (a name assigned later) stays empty
                pass
    return clone


def _global_names(code: types.CodeType) -> set[str]:
    """Names `code` (and the code of functions and comprehensions nested in it) may read as globals."""
    names = {ins.argval for ins in dis.get_instructions(code) if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names
