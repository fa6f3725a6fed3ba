"""The deployment's size limits (TINKERBELL_MAX_* settings), checked once for every face before anything is queued.

A request over a limit can never succeed as sent, so it is the user's error and the message names the setting.
The body limit also bounds what a zstd body may decompress to (api.proto.decompress).
"""

from __future__ import annotations

from typing import Any

from flask import current_app, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from core.errors import UserError
from core.settings import Settings


def _over(field: str, value: int, setting: str, limit: int) -> UserError:
    return UserError(f"{field}: {value} is more than the limit TINKERBELL_{setting}={limit}")


def body_too_large(what: str, limit: int) -> RequestEntityTooLarge:
    """413 naming the limit (what: "request body", "request body after zstd decompression")."""
    return RequestEntityTooLarge(f"body: {what} is larger than the limit TINKERBELL_MAX_BODY_BYTES={limit} bytes")


def body_limit() -> int:
    """TINKERBELL_MAX_BODY_BYTES of the app serving this request."""
    return current_app.config["SETTINGS"].max_body_bytes


def limit_body() -> None:
    """Before each request: no body past TINKERBELL_MAX_BODY_BYTES is read. A chunked body (no Content-Length) is
    read here, at most limit + 1 bytes (werkzeug stops there without saying so), and kept for the view."""
    limit = body_limit()
    if request.content_length is not None:
        request.max_content_length = limit
        if request.content_length > limit:
            raise body_too_large("request body", limit)
    elif request.environ.get("wsgi.input_terminated"):
        request.max_content_length = limit + 1
        if len(request.get_data(cache=True)) > limit:
            raise body_too_large("request body", limit)


def answer_too_large(exc: RequestEntityTooLarge) -> Any:
    """werkzeug's own 413 (a chunked body that ran past the limit) says which limit, like ours."""
    description = exc.description or ""
    if "TINKERBELL_MAX_BODY_BYTES" not in description:
        description = body_too_large("request body", body_limit()).description
    return jsonify(error=description, category="user"), 413


def check_batch(settings: Settings, data: list[dict[str, Any]]) -> None:
    """A forward/forward_backward request's datums (core.wire datums): count, tokens each, tokens in all."""
    if len(data) > settings.max_request_datums:
        raise _over("data", len(data), "MAX_REQUEST_DATUMS", settings.max_request_datums)
    total = 0
    for i, datum in enumerate(data):
        length = int(datum["tokens"]["shape"][0])
        if length > settings.max_datum_tokens:
            raise _over(f"data[{i}].model_input: tokens", length, "MAX_DATUM_TOKENS", settings.max_datum_tokens)
        total += length
    if total > settings.max_request_tokens:
        raise _over("data: model_input tokens in all", total, "MAX_REQUEST_TOKENS", settings.max_request_tokens)


def check_sample(settings: Settings, prompt_tokens: int, num_samples: int, max_tokens: int) -> None:
    """A sample request's prompt length, num_samples and sampling_params.max_tokens."""
    if prompt_tokens > settings.max_prompt_tokens:
        raise _over("prompt: tokens", prompt_tokens, "MAX_PROMPT_TOKENS", settings.max_prompt_tokens)
    if num_samples > settings.max_num_samples:
        raise _over("num_samples", num_samples, "MAX_NUM_SAMPLES", settings.max_num_samples)
    if max_tokens > settings.max_sample_tokens:
        raise _over("sampling_params.max_tokens", max_tokens, "MAX_SAMPLE_TOKENS", settings.max_sample_tokens)
