"""The OpenAI face: POST /v1/completions and /v1/chat/completions on a base model or tinker://…/sampler_weights/….

Same keys, same tenancy and the same Service.sample task as the native and Tinker sample routes; only the text
around the tokens is new (api.text_tokenizer). A sample task returns whole sequences, so stream=True sends the
finished sequences as server-sent-event chunks, one per token, rather than tokens as they are generated.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from flask import Blueprint, Response, current_app, g, jsonify
from werkzeug.exceptions import HTTPException

from api import validate
from api.datums import check_tokens
from api.futures import PENDING, error_body
from api.jsonwire import body
from api.service import Service
from api.text_tokenizer import TextTokenizer, text_tokenizer
from core.errors import NotFound, UserError
from core.wire import decode_array, encode_array

bp = Blueprint("openai", __name__, url_prefix="/v1")
WAIT_S = 600.0  # as the native synchronous /api/v1/sample
POLL_S = 60.0
COMPLETION_MAX_TOKENS = 16  # OpenAI's own default for /v1/completions
CHAT_MAX_TOKENS = 256  # OpenAI's chat default is "the rest of the context"; a sample task needs a number
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias", "response_format")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found"}
FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


def service() -> Service:
    return current_app.config["SERVICE"]


def openai_error(message: str, status: int, param: str | None = None, code: str | None = None) -> Response:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    match = FIELD.match(message)
    if param is None and match:
        param = match.group(1).removeprefix("sampling_params.")
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    response = jsonify(error={"message": message, "type": kind, "param": param, "code": code})
    response.status_code = status
    return response


@bp.errorhandler(UserError)
def _user_error(exc: UserError) -> Response:
    if isinstance(exc, NotFound):
        return openai_error(str(exc), 404, "model", "model_not_found")
    return openai_error(str(exc), 400)


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    return openai_error(exc.description or exc.name, exc.code or 500)


@bp.after_request
def _openai_shaped(response: Response) -> Response:
    """The key check (api.auth) answers before any view, in the Tinker shape; say it the OpenAI way here."""
    if response.status_code >= 400 and response.is_json:
        payload = response.get_json(silent=True) or {}
        if isinstance(payload.get("error"), str):
            return openai_error(payload["error"], response.status_code)
    return response


class HTTPTimeout(HTTPException):
    code = 504


# ---- request -> sample tasks ---------------------------------------------------------------------------------
def _target(model: Any) -> tuple[str, str | None]:
    """(base_model, adapter_dir) for `model`: a base model name or saved weights another key cannot see (404)."""
    model = validate.string(model, "model")
    if model.startswith("tinker://"):
        return service().sampler_target(g.owner, None, model)
    if model not in service().supported_models():
        raise NotFound(f"model: {model!r} is neither a served base model nor a tinker:// checkpoint path")
    return service().sampler_target(g.owner, model, None)


def _stop(value: Any, tokenizer: TextTokenizer) -> list[str] | None:
    """OpenAI stop strings. With stop strings the sample task stops only on them, so the end-of-sequence token
    joins the list (an OpenAI model always stops at its end token)."""
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise UserError("stop: must be a non-empty string or a list of non-empty strings")
    if not stops:
        return None
    return stops + ([tokenizer.eos_token] if tokenizer.eos_token and tokenizer.eos_token not in stops else [])


def _options(payload: dict[str, Any], tokenizer: TextTokenizer, default_max_tokens: int) -> tuple[dict, int]:
    """(sampling_params, n) from the OpenAI fields; what would change the answer and is not done here is refused."""
    for name in UNSUPPORTED:
        if payload.get(name) not in (None, False, [], {}):
            raise UserError(f"{name}: not supported by Tinkerbell's OpenAI face")
    for name in ("presence_penalty", "frequency_penalty"):
        if payload.get(name) not in (None, 0, 0.0):
            raise UserError(f"{name}: not supported by Tinkerbell's OpenAI face (only 0)")
    if payload.get("best_of") not in (None, payload.get("n", 1)):
        raise UserError("best_of: not supported by Tinkerbell's OpenAI face (only equal to n)")
    max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
    params = {
        "max_tokens": default_max_tokens if max_tokens is None else max_tokens,
        "temperature": 1.0 if payload.get("temperature") is None else payload["temperature"],
        "top_p": 1.0 if payload.get("top_p") is None else payload["top_p"],
        "seed": payload.get("seed"),
        "stop": _stop(payload.get("stop"), tokenizer),
    }
    if payload.get("top_k") is not None:  # vLLM's extra_body field
        params["top_k"] = payload["top_k"]
    n = validate.integer(1 if payload.get("n") is None else payload["n"], "n", 1, validate.MAX_SAMPLES)
    return params, n


def _submit(base_model: str, adapter_dir: str | None, prompt: list[int], params: dict, n: int) -> str:
    tokens = np.asarray(prompt, dtype=np.int64)
    check_tokens(tokens, "prompt")
    return service().sample(g.owner, base_model, adapter_dir, encode_array(tokens, "int64"), params, n, False, None)


def _wait(request_id: str) -> list[dict[str, Any]]:
    """The finished sample task's sequences, as the native /api/v1/sample waits for them."""
    deadline = time.monotonic() + WAIT_S
    while True:
        outcome = service().poll({}, request_id, min(POLL_S, max(0.0, deadline - time.monotonic())))
        if outcome is not PENDING:
            break
        if time.monotonic() >= deadline:
            raise HTTPTimeout(f"request {request_id}: no sample after {WAIT_S:.0f} s")
    state, result = outcome
    if state != "SUCCESS":
        failed = error_body(result)
        if failed["category"] == "user":
            raise UserError(failed["error"])
        raise RuntimeError(failed["error"])
    return [
        {"tokens": decode_array(s["tokens"]).tolist(), "stop_reason": s["stop_reason"]} for s in result["sequences"]
    ]


def _text(tokenizer: TextTokenizer, tokens: list[int], stops: list[str] | None) -> str:
    """The visible completion: special tokens dropped and the text cut before the first stop string, as OpenAI."""
    if not stops:
        return tokenizer.decode(tokens)
    raw = tokenizer.decode(tokens, skip_special_tokens=False)
    cut = min((raw.find(s) for s in stops if s in raw), default=len(raw))
    return tokenizer.strip_special(raw[:cut])


def _pieces(tokenizer: TextTokenizer, tokens: list[int], text: str) -> Iterator[str]:
    """`text` split at token boundaries (for streaming); a token that ends inside a character waits for the next."""
    sent = 0
    for i in range(len(tokens)):
        prefix = tokenizer.decode(tokens[: i + 1])
        end = min(len(prefix), len(text))
        if prefix.endswith("\ufffd") or text[:end] != prefix[:end] or end <= sent:
            continue
        yield text[sent:end]
        sent = end
    if sent < len(text):
        yield text[sent:]


class Choice:
    def __init__(self, tokenizer: TextTokenizer, sequence: dict[str, Any], stops: list[str] | None) -> None:
        self.tokens = sequence["tokens"]
        self.text = _text(tokenizer, self.tokens, stops)
        self.finish_reason = "stop" if sequence["stop_reason"] == "stop" else "length"


def _run(
    payload: dict[str, Any], target: tuple[str, str | None], prompts: list[list[int]], default_max_tokens: int
) -> tuple[TextTokenizer, list[Choice], int, str]:
    """Submit one sample task per prompt (n samples each), then wait: (tokenizer, choices, prompt tokens, an id)."""
    base_model, adapter_dir = target
    tokenizer = text_tokenizer(base_model, current_app.config["SETTINGS"])
    params, n = _options(payload, tokenizer, default_max_tokens)
    request_ids = [_submit(base_model, adapter_dir, prompt, params, n) for prompt in prompts]
    choices = [Choice(tokenizer, seq, params["stop"]) for rid in request_ids for seq in _wait(rid)]
    return tokenizer, choices, sum(len(p) for p in prompts), request_ids[0]


def _usage(choices: list[Choice], prompt_tokens: int) -> dict[str, int]:
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _sse(chunks: Iterator[dict[str, Any]]) -> Response:
    def events() -> Iterator[str]:
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return Response(events(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


def _wants_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


@bp.get("/models")
def models():
    """The served base models; a tinker:// sampler path is a model too, but listing checkpoints is the SDK's job."""
    return jsonify(
        object="list",
        data=[
            {"id": name, "object": "model", "created": 0, "owned_by": "tinkerbell"}
            for name in service().supported_models()
        ],
    )


# ---- /v1/completions -----------------------------------------------------------------------------------------
def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompts(value: Any, tokenizer_for: Any) -> list[list[int]]:
    """A string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(value, str):
        return [tokenizer_for().encode(value)]
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        return [tokenizer_for().encode(p) for p in value]
    if isinstance(value, list) and value and all(map(_is_token, value)):
        return [list(value)]
    if isinstance(value, list) and value and all(isinstance(p, list) and p and all(map(_is_token, p)) for p in value):
        return [list(p) for p in value]
    raise UserError("prompt: must be a string, a list of strings, a list of token ids or a list of such lists")


@bp.post("/completions")
def completions():
    payload = body()
    target = _target(payload.get("model"))
    prompts = _prompts(payload.get("prompt"), lambda: text_tokenizer(target[0], current_app.config["SETTINGS"]))
    tokenizer, choices, prompt_tokens, request_id = _run(payload, target, prompts, COMPLETION_MAX_TOKENS)
    head = {
        "id": f"cmpl-{request_id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": payload["model"],
    }
    if not validate.boolean(payload.get("stream"), "stream"):
        return jsonify(
            **head,
            choices=[
                {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                for i, c in enumerate(choices)
            ],
            usage=_usage(choices, prompt_tokens),
        )

    def chunks() -> Iterator[dict[str, Any]]:
        for i, c in enumerate(choices):
            for piece in _pieces(tokenizer, c.tokens, c.text):
                yield {**head, "choices": [{"index": i, "text": piece, "logprobs": None, "finish_reason": None}]}
            yield {**head, "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": c.finish_reason}]}
        if _wants_usage(payload):
            yield {**head, "choices": [], "usage": _usage(choices, prompt_tokens)}

    return _sse(chunks())


# ---- /v1/chat/completions ------------------------------------------------------------------------------------
def _messages(value: Any) -> list[dict[str, Any]]:
    """OpenAI messages with string content or text parts, as the chat template expects them: role + content."""
    if not isinstance(value, list) or not value:
        raise UserError("messages: must be a non-empty list of {role, content}")
    out = []
    for i, message in enumerate(value):
        message = validate.mapping(message, f"messages[{i}]")
        role = validate.string(message.get("role"), f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise UserError(f"messages[{i}].content[{j}]: only text parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise UserError(f"messages[{i}].content: must be a string or a list of text parts")
        out.append({"role": role, "content": content})
    return out


@bp.post("/chat/completions")
def chat_completions():
    payload = body()
    messages = _messages(payload.get("messages"))
    target = _target(payload.get("model"))
    prompt = text_tokenizer(target[0], current_app.config["SETTINGS"]).apply_chat_template(messages)
    tokenizer, choices, prompt_tokens, request_id = _run(payload, target, [prompt], CHAT_MAX_TOKENS)
    head = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": payload["model"],
    }
    if not validate.boolean(payload.get("stream"), "stream"):
        return jsonify(
            **head,
            choices=[
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(choices)
            ],
            usage=_usage(choices, prompt_tokens),
        )
    head["object"] = "chat.completion.chunk"

    def chunks() -> Iterator[dict[str, Any]]:
        for i, c in enumerate(choices):
            yield {
                **head,
                "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
            }
            for piece in _pieces(tokenizer, c.tokens, c.text):
                yield {**head, "choices": [{"index": i, "delta": {"content": piece}, "finish_reason": None}]}
            yield {**head, "choices": [{"index": i, "delta": {}, "finish_reason": c.finish_reason}]}
        if _wants_usage(payload):
            yield {**head, "choices": [], "usage": _usage(choices, prompt_tokens)}

    return _sse(chunks())
