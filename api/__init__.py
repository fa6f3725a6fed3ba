"""The HTTP API: a Flask app factory plus one blueprint per face (native, Tinker, OpenAI)
and one for operations.

Thin by rule (DESIGN rule 1): authenticate, validate, publish a Celery task, answer. Never imports torch.
"""

from __future__ import annotations

import logging
import time

import redis
from flask import Flask, Request, g, jsonify, request
from werkzeug.exceptions import HTTPException

from core.errors import Gone, NotFound, QuotaExceeded, UserError
from core.registry import Registry
from core.settings import Settings

log = logging.getLogger("tinkerbell.api")


class ApiRequest(Request):
    def on_json_loading_failed(self, e: ValueError | None):
        raise UserError(
            f"body: malformed JSON ({e})" if e else "body: expected a JSON body with Content-Type: application/json"
        )


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> Flask:
    """The API for `settings` (default: Settings.from_env()): its registry and its Celery app are made from them."""
    from api import custom_losses, loss_graphs, native, openai_compat, openapi, ops, tinker
    from api.auth import authenticate
    from api.service import Service
    from tasks.celery_app import make_app, result_backend

    settings = settings or Settings.from_env()
    registry = registry or Registry(settings)
    celery = make_app(settings, results=False)  # publishes only; results are read through result_backend
    service = Service(settings, registry, celery, result_backend(celery, settings))
    app = Flask(__name__)
    app.request_class = ApiRequest
    app.config.update(SETTINGS=settings, REGISTRY=registry, SERVICE=service)
    app.json.sort_keys = False
    app.before_request(_start_timer)
    app.before_request(authenticate)
    for module in (native, tinker, ops, custom_losses, loss_graphs, openai_compat, openapi):
        app.register_blueprint(module.bp)

    @app.errorhandler(UserError)
    def user_error(exc: UserError):
        status = 404 if isinstance(exc, NotFound) else 410 if isinstance(exc, Gone) else 400
        return jsonify(error=str(exc), category="user"), status

    @app.errorhandler(QuotaExceeded)
    def quota_exceeded(exc: QuotaExceeded):
        """429 + Retry-After for what frees itself (the SDK retries it with the same seq_id); 403 for what the key's
        owner must free, which the SDK must not retry (x-should-retry, read by its client)."""
        response = jsonify(error=str(exc), category="user")
        response.status_code = exc.status
        if exc.retry_after_s is not None:
            response.headers["Retry-After"] = str(exc.retry_after_s)
        response.headers["x-should-retry"] = "true" if exc.status == 429 else "false"
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return jsonify(error=exc.description, category="user"), exc.code

    @app.errorhandler(redis.ConnectionError)
    @app.errorhandler(redis.TimeoutError)
    def redis_unavailable(exc: Exception):
        """Redis away (restarting) past the registry client's retries: 503, which the SDK retries, not a 500."""
        log.warning("redis unavailable on %s: %s", request.path, exc)
        response = jsonify(error=f"redis unavailable, try again: {exc}", category="server")
        response.status_code = 503
        response.headers["Retry-After"] = "1"
        response.headers["x-should-retry"] = "true"
        return response

    @app.errorhandler(Exception)
    def server_error(exc: Exception):
        log.exception("unhandled error on %s", request.path)
        return jsonify(error=f"{type(exc).__name__}: {exc}", category="server"), 500

    return app


def _start_timer() -> None:
    g.started = time.perf_counter()
