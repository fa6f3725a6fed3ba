"""Losses: pure functions on torch tensors (DESIGN rule 6). Built-ins and custom losses share one registry.

Backends call `compute_loss`; importing this package registers the built-ins.
"""

from losses import builtin as builtin
from losses.contract import (
    VALID_REDUCTIONS,
    LossFnOutput,
    call_custom_loss,
    normalize_metric_key,
    pad_batch,
)
from losses.registry import (
    LossEntry,
    LossFn,
    compute_loss,
    get_loss,
    get_loss_entry,
    list_losses,
    register_loss,
    unregister_loss,
)

__all__ = [
    "VALID_REDUCTIONS",
    "LossEntry",
    "LossFn",
    "LossFnOutput",
    "call_custom_loss",
    "compute_loss",
    "get_loss",
    "get_loss_entry",
    "list_losses",
    "normalize_metric_key",
    "pad_batch",
    "register_loss",
    "unregister_loss",
]
