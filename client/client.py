"""HTTP client for the native API: one method per route, futures with `.result(timeout=…)`, readable errors."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import urllib3


class APIError(Exception):
    """Any error the service reported; `category` is "user" (fix the request) or "server"."""

    def __init__(self, message: str, category: str = "server", status: int | None = None) -> None:
        super().__init__(message)
        self.category = category
        self.status = status


class UserInputError(APIError):
    """The request can never succeed as sent; the message names the field."""


class NotFoundError(UserInputError):
    """Unknown model, future, checkpoint … (or one that belongs to another key)."""


class AuthError(APIError):
    """Missing, unknown or revoked API key, or a scope the key lacks."""


class ServerError(APIError):
    """Something failed on the service side; retrying may help."""


class RequestFailed(APIError):
    """A future finished with an error."""


class ConnectionFailed(ServerError):
    """The service could not be reached (or the connection broke); retrying may help."""


def _raise_for(response: urllib3.BaseHTTPResponse) -> None:
    if response.status < 400:
        return
    text = response.data.decode(errors="replace")
    try:
        payload = json.loads(text)
        message, category = payload.get("error", text), payload.get("category", "server")
    except (ValueError, AttributeError):
        message, category = text or response.reason, "server"
    cls = {401: AuthError, 403: AuthError, 404: NotFoundError}.get(response.status)
    if cls is None:
        cls = UserInputError if 400 <= response.status < 500 else ServerError
    raise cls(f"{response.status}: {message}", category, response.status)


class Future:
    """A request the service accepted; `.result()` long-polls /retrieve_future until it finishes."""

    def __init__(self, client: TinkerbellClient, request_id: str, extra: dict[str, Any] | None = None) -> None:
        self.client = client
        self.request_id = request_id
        self.extra = extra or {}
        self._result: Any = None
        self._done = False

    def result(self, timeout: float | None = 600.0) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"request {self.request_id} not finished after {timeout}s")
            poll = 20.0 if left is None else max(0.1, min(20.0, left))
            payload = self.client._post(
                "/retrieve_future", {"request_id": self.request_id, "timeout": poll}, timeout=poll + 15
            )
            if payload.get("type") == "try_again":
                continue
            if "error" in payload:
                cls = UserInputError if payload.get("category") == "user" else RequestFailed
                raise cls(payload["error"], payload.get("category", "server"))
            self._result = {**self.extra, **payload} if isinstance(payload, dict) else payload
            self._done = True
        return self._result

    def __repr__(self) -> str:
        return f"Future({self.request_id!r}, done={self._done})"


class TinkerbellClient:
    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 30.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["X-API-Key"] = api_key
        self.timeout = timeout
        self._http = urllib3.PoolManager(maxsize=16, retries=False)  # keep-alive connections; safe across threads
        self._seq: dict[str, int] = {}

    # ---- transport ------------------------------------------------------------------------
    def _request(
        self, method: str, path: str, payload: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        body = None if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        try:
            response = self._http.request(
                method,
                self.base_url + path,
                body=body,
                headers=self.headers,
                timeout=urllib3.Timeout(connect=10.0, read=timeout or self.timeout),
            )
        except urllib3.exceptions.HTTPError as exc:
            raise ConnectionFailed(f"{method} {self.base_url}{path}: {exc}") from exc
        _raise_for(response)
        return json.loads(response.data)

    def _post(self, path: str, payload: dict[str, Any], timeout: float | None = None) -> Any:
        return self._request("POST", path, payload, timeout)

    def _get(self, path: str) -> Any:
        return self._request("GET", path)

    def _next_seq(self, model_id: str) -> int:
        self._seq[model_id] = self._seq.get(model_id, 0) + 1
        return self._seq[model_id]

    # ---- service --------------------------------------------------------------------------
    def healthz(self) -> dict[str, Any]:
        return self._get("/healthz")

    def get_server_capabilities(self) -> dict[str, Any]:
        return self._get("/get_server_capabilities")

    def list_loss_functions(self) -> dict[str, Any]:
        return self._get("/list_loss_functions")

    def retrieve_future(self, request_id: str) -> Future:
        return Future(self, request_id)

    # ---- custom losses (see CUSTOM_LOSS_GUIDE.md) -----------------------------------------
    def register_custom_loss(self, fn: Any, name: str | None = None) -> dict[str, Any]:
        """Upload `fn` (dill, helpers and closures by value) as the loss `name`; returns {name, version, hash, …}.

        Use it as `loss_fn=name` in forward_backward. The service must allow custom code and the key needs the
        custom_code scope (AuthError says how to get both).
        """
        from client.custom_loss import serialize_loss

        return self._post("/register_custom_loss", serialize_loss(fn, name))

    def get_custom_loss(self, name: str) -> dict[str, Any]:
        """One of your losses: current version, source and every version's metadata."""
        return self._get(f"/custom_losses/{name}")

    def delete_custom_loss(self, name: str) -> dict[str, Any]:
        return self._request("DELETE", f"/custom_losses/{name}")

    # ---- adapters -------------------------------------------------------------------------
    def add_lora(
        self,
        base_model: str | None = None,
        rank: int = 32,
        alpha: float | None = None,
        seed: int | None = None,
        train_attn: bool = True,
        train_mlp: bool = True,
        train_unembed: bool = True,
    ) -> Future:
        """Create an adapter; the future's result has model_id."""
        payload: dict[str, Any] = {
            "base_model": base_model,
            "rank": rank,
            "seed": seed,
            "train_attn": train_attn,
            "train_mlp": train_mlp,
            "train_unembed": train_unembed,
        }
        if alpha is not None:
            payload["alpha"] = alpha
        answer = self._post("/add_lora", payload)
        self._seq.setdefault(answer["model_id"], 0)
        return Future(self, answer["request_id"], {"model_id": answer["model_id"]})

    def remove_lora(self, model_id: str) -> Future:
        return Future(self, self._post("/remove_lora", {"model_id": model_id})["request_id"])

    # ---- training -------------------------------------------------------------------------
    def forward_backward(
        self,
        model_id: str,
        data: Iterable[dict[str, Any]],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict[str, Any] | None = None,
        forward_only: bool = False,
    ) -> Future:
        """data: [{"model_input": [ids], "loss_fn_inputs": {"target_tokens": [...], "weights": [...], …}}]."""
        payload = {
            "model_id": model_id,
            "seq_id": self._next_seq(model_id),
            "data": list(data),
            "loss_fn": loss_fn,
            "loss_fn_config": loss_fn_config or {},
            "forward_only": forward_only,
        }
        return Future(self, self._post("/fwdbwd", payload)["request_id"])

    def forward(
        self,
        model_id: str,
        data: Iterable[dict[str, Any]],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict[str, Any] | None = None,
    ) -> Future:
        return self.forward_backward(model_id, data, loss_fn, loss_fn_config, forward_only=True)

    def optim_step(self, model_id: str, learning_rate: float = 1e-4, **adam_params: float) -> Future:
        payload = {
            "model_id": model_id,
            "seq_id": self._next_seq(model_id),
            "adam_params": {"learning_rate": learning_rate, **adam_params},
        }
        return Future(self, self._post("/optim_step", payload)["request_id"])

    def save_state(self, model_id: str, name: str | None = None, for_sampler: bool = False) -> Future:
        """Future result: {"path": "tinker://<model_id>/weights/<name>"} (sampler_weights when for_sampler)."""
        payload = {"model_id": model_id, "seq_id": self._next_seq(model_id), "name": name, "for_sampler": for_sampler}
        return Future(self, self._post("/save_state", payload)["request_id"])

    def load_state(self, model_id: str, path: str, optimizer: bool = True) -> Future:
        payload = {"model_id": model_id, "seq_id": self._next_seq(model_id), "path": path, "optimizer": optimizer}
        return Future(self, self._post("/load_state", payload)["request_id"])

    # ---- sampling -------------------------------------------------------------------------
    def sample(
        self,
        prompt: list[int],
        base_model: str | None = None,
        model_path: str | None = None,
        max_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        stop: list[str] | list[int] | None = None,
        seed: int | None = None,
        num_samples: int = 1,
        prompt_logprobs: bool = False,
    ) -> Future:
        """Sample from a base model or saved sampler weights (model_path="tinker://…")."""
        params = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "stop": stop,
            "seed": seed,
        }
        payload = {
            "prompt": prompt,
            "base_model": base_model,
            "model_path": model_path,
            "sampling_params": params,
            "num_samples": num_samples,
            "prompt_logprobs": prompt_logprobs,
        }
        return Future(self, self._post("/asample", payload)["request_id"])
