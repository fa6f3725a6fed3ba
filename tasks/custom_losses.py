"""Worker side of custom losses: load an owner's uploaded loss by content hash, cache it, and run it guarded.

Guarded = under a time limit, cut off from the model's autograd graph, every failure a UserError that comes back
to the client; a failed call leaves the adapter's gradients exactly as they were.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import functools
import hashlib
import linecache
import logging
import os
import signal
import sys
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from core.errors import UserError
from core.settings import Settings
from losses import LossFnOutput, get_loss_entry, register_loss, unregister_loss
from losses.contract import _unpack

log = logging.getLogger("tinkerbell.custom_losses")

CODE_KEY = "tb:losses:code:{}"  # content hash -> base64 dill payload (written by api/custom_losses.py)
META_KEY = "tb:losses:meta:{}"  # content hash -> JSON {source, filename, first_line, python}
CACHE_SIZE = 64  # loaded losses kept per worker; the oldest is dropped from the loss registry
ENABLE_HINT = "set TINKERBELL_ALLOW_CUSTOM_CODE=1 on the API and on every worker (see CUSTOM_LOSS_GUIDE.md)"

_loaded: OrderedDict[str, str] = OrderedDict()  # registry key -> content hash, least recently used first
_OUR_FILES = {__file__, contextlib.__file__}  # where the time-limit alarm never raises


class LossTimeout(BaseException):
    """Raised by SIGALRM inside user code. A BaseException, so `except Exception` in the loss cannot swallow it."""


def resolve_loss_fn(loss_fn: str, custom_loss: dict[str, Any] | None, settings: Settings, redis: Any) -> str:
    """The loss registry name to run: the built-in `loss_fn`, or the custom loss api/ resolved at publish time.

    Only api/ decides which custom loss a request may use (it checked the owner); an uploaded loss's name (code or
    graph, tasks/loss_graphs.py) reaching a worker any other way is refused, so one key can never run another's.
    """
    if custom_loss is None:
        if loss_fn == "custom" or _is_uploaded(loss_fn):
            raise UserError(f"loss_fn: unknown loss {loss_fn!r}; see GET /list_loss_functions")
        return loss_fn
    return load_custom_loss(custom_loss, settings, redis)


def _is_uploaded(name: str) -> bool:
    try:
        return not get_loss_entry(name).builtin
    except UserError:
        return False


def registry_key(spec: dict[str, Any]) -> str:
    """Unique per owner, name and code, e.g. 'my_dpo/v2/local/3fa2c1d9e0ab4b7c' (the user's name comes first in
    messages)."""
    return f"{spec['name']}/v{spec['version']}/{spec['owner']}/{spec['hash'][:16]}"


def load_custom_loss(spec: dict[str, Any], settings: Settings, redis: Any) -> str:
    """Register the loss `spec` ({name, version, hash, owner}) here on first use; return its registry key."""
    name = spec["name"]
    if not settings.allow_custom_code:
        raise UserError(f"loss_fn {name}: custom code is disabled on this worker; {ENABLE_HINT}")
    key = registry_key(spec)
    if key in _loaded:
        _loaded.move_to_end(key)
        return key
    digest = spec["hash"]
    label = f"{name} (v{spec['version']})"
    raw = redis.get(CODE_KEY.format(digest))
    if raw is None:
        raise UserError(
            f"loss_fn {label}: its code ({digest[:12]}) is not in the registry any more; register the loss again"
        )
    payload = base64.b64decode(raw)
    if hashlib.sha256(payload).hexdigest() != digest:
        raise UserError(f"loss_fn {label}: stored code does not match its hash {digest[:12]}; register the loss again")
    meta = _json(redis.get(META_KEY.format(digest)))
    _remember_source(meta)
    fn = _deserialize(payload, label, meta, settings.custom_loss_timeout_s)
    register_loss(
        key, guarded(fn, label, settings.custom_loss_timeout_s), custom=True, doc=fn.__doc__ or "", replace=True
    )
    _loaded[key] = digest
    while len(_loaded) > CACHE_SIZE:
        old, _ = _loaded.popitem(last=False)
        unregister_loss(old)
    log.info("loaded custom loss %s (%d bytes)", key, len(payload))
    return key


def _json(raw: str | None) -> dict[str, Any]:
    import json

    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _deserialize(payload: bytes, label: str, meta: dict[str, Any], timeout_s: float) -> Callable[..., Any]:
    import dill

    try:
        with time_limit(label, timeout_s, "loading its code"):
            fn = dill.loads(payload)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 -- user payload: any failure to load it is the user's to fix
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        client = meta.get("python")
        hint = (
            f"; it was serialized by Python {client} and this worker runs {here}" if client and client != here else ""
        )
        raise UserError(
            f"loss_fn {label}: could not load the uploaded code: {type(exc).__name__}: {exc}{hint}"
            " (modules it imports must be installed on the workers; functions and closures travel by value)"
        ) from None
    if not callable(fn):
        raise UserError(f"loss_fn {label}: the uploaded object is {type(fn).__name__}, not a function")
    return fn


def _remember_source(meta: dict[str, Any]) -> None:
    """Put the uploaded source where `traceback` looks, so a traceback from the worker shows the user's lines."""
    source, filename, first = meta.get("source"), meta.get("filename"), meta.get("first_line")
    if not (isinstance(source, str) and isinstance(filename, str) and isinstance(first, int)) or os.path.exists(
        filename
    ):
        return
    lines = ["\n"] * max(first - 1, 0) + source.splitlines(keepends=True)
    linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)


@contextmanager
def time_limit(label: str, seconds: float, doing: str = "running") -> Iterator[None]:
    """Raise UserError when the body runs past `seconds`, interrupting Python code (loops, sleeps in small steps).

    On the main thread SIGALRM interrupts it; elsewhere (the worker's engine thread) a timer thread raises
    LossTimeout in this thread with CPython's PyThreadState_SetAsyncExc, which takes effect at the next bytecode.
    Either way the interruption repeats every 50 ms after the deadline, so a loss that swallows one gets the next,
    and it never fires in this module's or contextlib's frames, so it cannot escape while the limit is reported.
    """
    message = f"loss_fn {label}: exceeded the {seconds:g} s limit while {doing} (TINKERBELL_CUSTOM_LOSS_TIMEOUT_S)"
    if seconds <= 0:
        yield
        return
    state = {"armed": True, "fired": False}
    on_main = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if on_main:

        def on_alarm(signum: int, frame: Any) -> None:
            if state["armed"] and (frame is None or frame.f_code.co_filename not in _OUR_FILES):
                state["fired"] = True
                raise LossTimeout()

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    else:
        watchdog = _Watchdog(threading.get_ident(), seconds, state)
        watchdog.start()
    try:
        yield
    except LossTimeout:
        state["fired"] = True
    finally:
        state["armed"] = False
        if on_main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        else:
            watchdog.disarm()
    if state["fired"]:  # also when the loss swallowed the interruption and returned
        raise UserError(message)


class _Watchdog(threading.Thread):
    """Raises LossTimeout in thread `target` after `seconds`, then every 50 ms, while the limit is armed."""

    def __init__(self, target: int, seconds: float, state: dict[str, bool]) -> None:
        super().__init__(name="custom-loss watchdog", daemon=True)
        self.target_id, self.seconds, self.state = target, seconds, state
        self.done = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        wait = self.seconds
        while not self.done.wait(wait):
            with self.lock:  # never raise once disarm() has begun
                if not self.state["armed"]:
                    return
                frame = sys._current_frames().get(self.target_id)
                if frame is not None and frame.f_code.co_filename in _OUR_FILES:
                    wait = 0.01  # inside our own bookkeeping: try again in a moment
                    continue
                self.state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self.target_id), ctypes.py_object(LossTimeout)
                )
            wait = 0.05

    def disarm(self) -> None:
        with self.lock:
            self.state["armed"] = False
            self.done.set()
            # An exception set but not yet raised would fire later in our code: clear it.
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.target_id), None)


def _traceback_message(label: str, exc: BaseException) -> str:
    """'loss_fn x raised ValueError: boom' plus the traceback of the user's frames (ours are cut off)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    lines = traceback.format_exception(type(exc), exc, tb)
    return f"loss_fn {label} raised {type(exc).__name__}: {exc}\n{''.join(lines).rstrip()}"


def guarded(fn: Callable[..., Any], label: str, timeout_s: float) -> Callable[..., Any]:
    """Wrap a user loss for the custom-loss contract (losses/contract.py): same inputs, same LossFnOutput.

    The user's code sees model_outputs["logprobs"] as a detached leaf, so it can never reach the model (no
    .backward() into the adapter). Its gradient d loss / d logprobs is taken here, under the time limit, and
    handed back as a surrogate loss with the same value whose backward through the model gives the same
    parameter gradients. Anything that goes wrong happens before the backend's backward.
    """

    @functools.wraps(fn)
    def run(
        model_outputs: dict[str, Tensor], loss_fn_inputs: dict[str, Tensor], attention_mask: Tensor, **config: Any
    ) -> Any:
        logprobs = model_outputs["logprobs"]  # (B, T) or (B, T, K)
        leaf = logprobs.detach().requires_grad_(logprobs.requires_grad)
        user_outputs = {**model_outputs, "logprobs": leaf}
        with time_limit(label, timeout_s):
            try:
                out = _unpack(fn(user_outputs, loss_fn_inputs, attention_mask, **config), label)
                loss = out.loss
                if not (
                    leaf.requires_grad
                    and isinstance(loss, Tensor)
                    and loss.dim() == 0
                    and loss.is_floating_point()
                    and loss.requires_grad
                ):
                    return out  # forward only, or a result the contract check will name
                if not torch.isfinite(loss).item():
                    return out  # the contract says "loss is not finite"
                (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)  # (B, T): d loss / d logprobs
            except (UserError, torch.OutOfMemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 -- user code: any failure is the user's, sent back with its traceback
                raise UserError(_traceback_message(label, exc)) from None
        if grad is None:
            grad = torch.zeros_like(leaf)
        if not torch.isfinite(grad).all().item():
            raise UserError(
                f"loss_fn {label}: the gradient of the loss with respect to model_outputs['logprobs'] contains nan "
                "or inf"
            )
        surrogate = (logprobs * grad.to(logprobs.dtype)).sum()  # d surrogate / d logprobs == grad
        surrogate = surrogate - surrogate.detach() + loss.detach()  # value: the user's loss, exactly
        return LossFnOutput(loss=surrogate, logprobs=out.logprobs, diagnostics=out.diagnostics)

    return run


def trainable_parameters(backend: Any, model_id: str) -> list[torch.nn.Parameter]:
    """The adapter's trainable parameters, when the backend lets us see them (for restoring gradients)."""
    public = getattr(backend, "trainable_parameters", None)
    if callable(public):
        return list(public(model_id))
    get = getattr(backend, "_get", None)
    params = getattr(get(model_id), "params", None) if callable(get) else None
    return list(params.values()) if isinstance(params, dict) else []


@contextmanager
def gradients_restored_on_failure(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """If the body raises, put every parameter's .grad back as it was: a failed request accumulates nothing."""
    saved = [None if p.grad is None else p.grad.detach().clone() for p in params]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for param, grad in zip(params, saved):
                if grad is None:
                    param.grad = None
                elif param.grad is None:
                    param.grad = grad
                else:
                    param.grad.copy_(grad)
        raise
