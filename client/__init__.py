"""Tinkerbell's own Python client for the native API. Calls return futures that poll task ids.

    from client import TinkerbellClient
    tb = TinkerbellClient("http://localhost:8000", api_key="tml-…")
    model_id = tb.add_lora(rank=16).result()["model_id"]
    tb.forward_backward(model_id, [{"model_input": [...], "loss_fn_inputs": {"target_tokens": [...], "weights": [...]}}]).result()
"""

from client.client import APIError, AuthError, Future, NotFoundError, RequestFailed, ServerError, TinkerbellClient, UserInputError

__all__ = ["APIError", "AuthError", "Future", "NotFoundError", "RequestFailed", "ServerError", "TinkerbellClient", "UserInputError"]
