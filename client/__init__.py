"""Tinkerbell's own Python client for the native API. Calls return futures that poll task ids.

from client import TinkerbellClient
tb = TinkerbellClient("http://localhost:8000", api_key="tml-…")
model_id = tb.add_lora(rank=16).result()["model_id"]
datum = {"model_input": [...], "loss_fn_inputs": {"target_tokens": [...], "weights": [...]}}
tb.forward_backward(model_id, [datum]).result()
"""

from typing import Any

from client.client import (
    APIError,
    AuthError,
    ConnectionFailed,
    Future,
    NotFoundError,
    RequestFailed,
    ServerError,
    TinkerbellClient,
    UserInputError,
)
from client.custom_loss import custom_loss

__all__ = [
    "APIError",
    "AuthError",
    "ConnectionFailed",
    "Future",
    "LossFnOutput",
    "NotFoundError",
    "RequestFailed",
    "ServerError",
    "TinkerbellClient",
    "UserInputError",
    "custom_loss",
]


def __getattr__(name: str) -> Any:
    """LossFnOutput comes from losses.contract, which imports torch: only when asked for."""
    if name == "LossFnOutput":
        from losses.contract import LossFnOutput

        return LossFnOutput
    raise AttributeError(f"module 'client' has no attribute {name!r}")
