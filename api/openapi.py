"""`GET /openapi.json`: an OpenAPI 3.1 document of the JSON routes, written from the routes' own validation.

Paths and methods come from the app's URL map, so the document lists exactly the routes that exist; each request
body is a JSON Schema of what api/validate.py, api/jsonwire.py and api/limits.py accept, with this deployment's
TINKERBELL_MAX_* limits filled in. The routes validate by hand (every refusal names its field), so no schema library
derives this; tests/test_openapi.py checks that every JSON route has its body here and fuzzes them with schemathesis.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify

from api.auth import public
from api.validate import INT32_MAX, INT64_MAX, MAX_SAMPLES, MAX_SEQ_ID, MAX_TOPK, MAX_TTL_S, UINT64_MAX
from core.settings import Settings

bp = Blueprint("openapi", __name__)

# Routes that are no JSON API: the status page and its assets, and the document itself.
UNDOCUMENTED = {"static", "ops.favicon", "ops.status_page", "openapi.openapi_json"}
LOSSES = ["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "custom"]
KINDS = ["weights", "sampler_weights", "external_weights"]


def _s(**schema: Any) -> dict[str, Any]:
    return schema


def _obj(required: tuple[str, ...] = (), **properties: Any) -> dict[str, Any]:
    """An object with these properties; others are allowed (clients send extras, the routes ignore them)."""
    return _s(type="object", properties=properties, required=list(required))


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


STRING = _s(type="string", minLength=1)
BOOL = _nullable(_s(type="boolean"))
TTL = _nullable(_s(type="integer", minimum=1, maximum=MAX_TTL_S))
SEQ = _nullable(_s(type="integer", minimum=1, maximum=MAX_SEQ_ID))
METADATA = _nullable(_s(type="object", additionalProperties={"type": "string"}))
LORA_FIELDS = {
    "rank": _s(type="integer", minimum=1, maximum=1024),
    "alpha": _s(type="number", exclusiveMinimum=0),
    "seed": _nullable(_s(type="integer", minimum=0, maximum=UINT64_MAX)),
    "train_attn": BOOL,
    "train_mlp": BOOL,
    "train_unembed": BOOL,
}


def schemas(settings: Settings) -> dict[str, Any]:
    """The shared component schemas, with this deployment's size limits."""
    token_ids = _s(type="array", items=_s(type="integer", minimum=0, maximum=INT32_MAX), minItems=1)
    numbers = _s(type="array", items=_s(type="number"))
    return {
        "Error": _obj(("error", "category"), error=_s(type="string"), category=_s(enum=["user", "server"])),
        "Future": _obj(("request_id",), request_id=_s(type="string"), model_id=_s(type="string")),
        "Tokens": {**token_ids, "maxItems": settings.max_datum_tokens},
        "ModelInput": {
            "anyOf": [
                _ref("Tokens"),
                _obj(
                    ("chunks",),
                    chunks=_s(
                        type="array",
                        minItems=1,
                        items=_obj(("tokens",), type=_s(enum=["encoded_text"]), tokens=_ref("Tokens")),
                    ),
                ),
            ]
        },
        "TensorData": {
            "anyOf": [
                numbers,
                _obj(
                    ("data",),
                    data=numbers,
                    dtype=_s(enum=["float32", "int64", "int32"]),
                    shape=_nullable(_s(type="array", items=_s(type="integer", minimum=0))),
                    sparse_crow_indices=_nullable(_s(type="array", items=_s(type="integer", minimum=0))),
                    sparse_col_indices=_nullable(_s(type="array", items=_s(type="integer", minimum=0))),
                ),
            ]
        },
        "Datum": _obj(
            ("model_input", "loss_fn_inputs"),
            model_input=_ref("ModelInput"),
            loss_fn_inputs=_s(type="object", additionalProperties=_ref("TensorData")),
        ),
        "Data": _s(type="array", items=_ref("Datum"), maxItems=settings.max_request_datums),
        "LossFn": _s(enum=LOSSES),
        "LossFnConfig": _nullable(_s(type="object")),
        "LoraConfig": _nullable(_obj(**LORA_FIELDS)),
        "AdamParams": _nullable(
            _obj(
                learning_rate=_s(type="number", exclusiveMinimum=0),
                beta1=_s(type="number", minimum=0, exclusiveMaximum=1),
                beta2=_s(type="number", minimum=0, exclusiveMaximum=1),
                eps=_s(type="number", exclusiveMinimum=0),
                weight_decay=_s(type="number", minimum=0),
                grad_clip_norm=_s(type="number", minimum=0),
            )
        ),
        "SamplingParams": _nullable(
            _obj(
                max_tokens=_s(type="integer", minimum=1, maximum=settings.max_sample_tokens),
                temperature=_s(type="number", minimum=0),
                top_p=_s(type="number", exclusiveMinimum=0, maximum=1),
                top_k=_s(type="integer", minimum=-1, maximum=INT32_MAX),
                seed=_nullable(_s(type="integer", minimum=0, maximum=UINT64_MAX)),
                stop=_nullable(
                    {
                        "anyOf": [
                            _s(type="string"),
                            _s(type="array", items=_s(type="string")),
                            _s(type="array", items=_s(type="integer", minimum=0, maximum=INT32_MAX)),
                        ]
                    }
                ),
            )
        ),
        "PromptTokens": {**token_ids, "maxItems": settings.max_prompt_tokens},
        "Prompt": {
            "anyOf": [
                _ref("PromptTokens"),
                _obj(
                    ("chunks",),
                    chunks=_s(type="array", minItems=1, items=_obj(("tokens",), tokens=_ref("PromptTokens"))),
                ),
            ]
        },
    }


def sample_body() -> dict[str, Any]:
    return _obj(
        ("prompt",),
        base_model=STRING,
        model_path=STRING,
        sampling_session_id=STRING,
        prompt=_ref("Prompt"),
        num_samples=_s(type="integer", minimum=1, maximum=MAX_SAMPLES),
        sampling_params=_ref("SamplingParams"),
        prompt_logprobs=BOOL,
        topk_prompt_logprobs=_nullable(_s(type="integer", minimum=0, maximum=MAX_TOPK)),
    )


def openai_fields(settings: Settings) -> dict[str, Any]:
    return {
        "model": STRING,
        "max_tokens": _nullable(_s(type="integer", minimum=1, maximum=settings.max_sample_tokens)),
        "temperature": _nullable(_s(type="number", minimum=0)),
        "top_p": _nullable(_s(type="number", exclusiveMinimum=0, maximum=1)),
        "n": _nullable(_s(type="integer", minimum=1, maximum=MAX_SAMPLES)),
        "seed": _nullable(_s(type="integer", minimum=0, maximum=UINT64_MAX)),
        "stop": _nullable({"anyOf": [STRING, _s(type="array", items=STRING)]}),
        "stream": BOOL,
    }


def bodies(settings: Settings) -> dict[str, dict[str, Any]]:
    """The JSON request body of each route, by Flask endpoint."""
    model = {"model_id": STRING, "seq_id": SEQ}
    save = _obj(("model_id",), **model, path=STRING, ttl_seconds=TTL)
    return {
        # native face
        "native.add_lora": _obj(
            session_id=STRING, base_model=STRING, lora_config=_ref("LoraConfig"), user_metadata=METADATA, **LORA_FIELDS
        ),
        "native.remove_lora": _obj(("model_id",), model_id=STRING),
        "native.fwdbwd": _obj(
            ("model_id", "data"),
            **model,
            data=_ref("Data"),
            loss_fn=_ref("LossFn"),
            loss_fn_config=_ref("LossFnConfig"),
            forward_only=BOOL,
        ),
        "native.optim_step": _obj(("model_id",), **model, adam_params=_ref("AdamParams")),
        "native.save_state": _obj(("model_id",), **model, name=STRING, for_sampler=BOOL, ttl_seconds=TTL),
        "native.load_state": _obj(("model_id", "path"), **model, path=STRING, optimizer=BOOL),
        "native.sample_sync": sample_body(),
        "native.asample": sample_body(),
        "native.retrieve_future": _obj(
            ("request_id",), request_id=STRING, timeout=_nullable(_s(type="number", minimum=0, maximum=60))
        ),
        # Tinker face
        "tinker.client_config": _obj(),
        "tinker.dynamic_config": _obj(),
        "tinker.create_session": _obj(
            tags=_s(type="array", items=_s(type="string")),
            user_metadata=METADATA,
            sdk_version=_s(type="string"),
            project_id=_s(type="string"),
            display_name=_s(type="string"),
        ),
        "tinker.session_heartbeat": _obj(("session_id",), session_id=STRING),
        "tinker.finish_session": _obj(reason=_nullable(_obj(type=_s(type="string")))),
        "tinker.telemetry": _obj(),
        "tinker.cancel_future": _obj(("request_id",), request_id=STRING),
        "tinker.create_model": _obj(
            ("session_id", "model_seq_id"),
            session_id=STRING,
            model_seq_id=_s(type="integer", minimum=0, maximum=INT64_MAX),
            base_model=STRING,
            lora_config=_ref("LoraConfig"),
            user_metadata=METADATA,
            optimizer_config=_nullable(_obj(type=_s(enum=["adamw"]))),
        ),
        "tinker.get_info": _obj(("model_id",), model_id=STRING),
        "tinker.forward_backward": _obj(
            ("model_id", "forward_backward_input"),
            **model,
            forward_backward_input=_obj(
                ("data",), data=_ref("Data"), loss_fn=_ref("LossFn"), loss_fn_config=_ref("LossFnConfig")
            ),
            forward_only=BOOL,
        ),
        "tinker.optim_step": _obj(
            ("model_id",),
            **model,
            adam_params=_ref("AdamParams"),
            optimizer_params=_nullable(_obj(type=_s(enum=["adamw"]))),
        ),
        "tinker.save_weights": save,
        "tinker.save_weights_for_sampler": _obj(
            ("model_id",),
            **model,
            path=STRING,
            sampling_session_seq_id=_s(type="integer", minimum=0, maximum=INT64_MAX),
            ttl_seconds=TTL,
        ),
        "tinker.save_weights_external": save,
        "tinker.load_weights": _obj(
            ("path",),
            path=STRING,
            optimizer=BOOL,
            model_id=STRING,
            seq_id=SEQ,
            session_id=STRING,
            model_seq_id=_s(type="integer", minimum=0, maximum=INT64_MAX),
            base_model=STRING,
            user_metadata=METADATA,
        ),
        "tinker.weights_info": _obj(("tinker_path",), tinker_path=STRING),
        "tinker.create_sampling_session": _obj(
            ("session_id", "sampling_session_seq_id"),
            session_id=STRING,
            sampling_session_seq_id=_s(type="integer", minimum=0, maximum=INT64_MAX),
            base_model=STRING,
            model_path=STRING,
        ),
        "tinker.retrieve_future": _obj(("request_id",), request_id=STRING),
        "tinker.tinker_rest.copy_weights": _obj(("source_path",), source_path=STRING, ttl_seconds=TTL),
        "tinker.tinker_rest.set_checkpoint_ttl": _obj(("ttl_seconds",), ttl_seconds=TTL),
        "custom_losses.register_custom_loss": _obj(
            ("name", "code"),
            name=_s(type="string", pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$"),
            code=_s(type="string", contentEncoding="base64"),
            source=_s(type="string"),
            filename=_s(type="string"),
            first_line=_s(type="integer"),
            python=_s(type="string"),
            signature=_s(type="string"),
            docstring=_s(type="string"),
            config=_s(type="object"),
        ),
        "loss_graphs.create_custom_loss": _obj(
            ("session_id", "name", "inputs", "graph"),
            session_id=STRING,
            name=_s(type="string", minLength=1, maxLength=128),
            inputs=_s(
                type="array",
                items=_obj(("name", "rank"), name=STRING, rank=_s(type="integer", minimum=1, maximum=2)),
            ),
            graph=_obj(
                ("nodes",),
                format=_s(enum=[1]),
                nodes=_s(
                    type="array",
                    minItems=1,
                    items=_obj(
                        ("op", "name", "target"),
                        op=_s(enum=["placeholder", "call_function", "call_method", "get_attr", "output"]),
                        name=_s(type="string", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"),
                        target=_s(type="string"),
                        args=_s(type="array"),
                        kwargs=_s(type="object"),
                    ),
                ),
            ),
        ),
        # OpenAI face
        "openai.completions": _obj(
            ("model", "prompt"),
            **openai_fields(settings),
            prompt={
                "anyOf": [
                    STRING,
                    _s(type="array", minItems=1, items=STRING),
                    _ref("PromptTokens"),
                    _s(type="array", minItems=1, items=_ref("PromptTokens")),
                ]
            },
        ),
        "openai.chat_completions": _obj(
            ("model", "messages"),
            **openai_fields(settings),
            messages=_s(
                type="array",
                minItems=1,
                items=_obj(
                    ("role", "content"),
                    role=_s(enum=["system", "user", "assistant"]),
                    content={
                        "anyOf": [
                            _s(type="string"),
                            _s(
                                type="array",
                                items=_obj(("type", "text"), type=_s(enum=["text"]), text=_s(type="string")),
                            ),
                        ]
                    },
                ),
            ),
        ),
    }


# Query parameters of the listing routes (api.tinker_rest._page) and of signed downloads.
PAGE = [
    {"name": "limit", "in": "query", "schema": _s(type="integer", minimum=0, maximum=1000)},
    {"name": "offset", "in": "query", "schema": _s(type="integer", minimum=0, maximum=INT32_MAX)},
]
QUERIES = {
    "tinker.tinker_rest.list_training_runs": PAGE,
    "tinker.tinker_rest.list_user_checkpoints": PAGE,
    "tinker.tinker_rest.list_sessions": PAGE,
    "tinker.tinker_rest.download": [
        {"name": "expires", "in": "query", "schema": _s(type="integer")},
        {"name": "sig", "in": "query", "schema": _s(type="string")},
    ],
}
RULE_PARAM = re.compile(r"<(?:(\w+):)?(\w+)>")


def openapi_path(rule: str) -> str:
    """A Flask rule as an OpenAPI path: /x/<path:checkpoint_id> -> /x/{checkpoint_id}."""
    return RULE_PARAM.sub(r"{\2}", rule)


def _operation(app: Flask, endpoint: str, rule: str, method: str, body: dict[str, Any] | None) -> dict[str, Any]:
    path_params = [
        {"name": name, "in": "path", "required": True, "schema": STRING} for _, name in RULE_PARAM.findall(rule)
    ]
    view = app.view_functions.get(endpoint)
    errors = {"description": "refused: the message names the field or limit", "content": _json(_ref("Error"))}
    operation: dict[str, Any] = {
        "operationId": f"{method.lower()} {openapi_path(rule)}",
        "parameters": path_params + QUERIES.get(endpoint, []),
        "responses": {"200": {"description": "done"}, "4XX": errors},
    }
    if getattr(view, "public", False):
        operation["security"] = []
    if body is not None:
        operation["requestBody"] = {"required": True, "content": _json(body)}
    return operation


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def document(app: Flask) -> dict[str, Any]:
    """The OpenAPI document of `app`: every route but UNDOCUMENTED, with its JSON body where it takes one."""
    settings: Settings = app.config["SETTINGS"]
    request_bodies = bodies(settings)
    paths: dict[str, dict[str, Any]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint in UNDOCUMENTED:
            continue
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            body = request_bodies.get(rule.endpoint) if method in ("POST", "PUT") else None
            if rule.endpoint == "tinker.tinker_rest.publish_checkpoint":
                body = None  # POST and DELETE …/publish read no body
            paths.setdefault(openapi_path(rule.rule), {})[method.lower()] = _operation(
                app, rule.endpoint, rule.rule, method, body
            )
    return {
        "openapi": "3.1.0",
        "info": {"title": "Tinkerbell", "version": "1", "description": "The Tinker API and Tinkerbell's own routes."},
        "paths": paths,
        "components": {
            "schemas": schemas(settings),
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
        "security": [{"apiKey": []}],
    }


@bp.get("/openapi.json")
@public
def openapi_json():
    """Built once per process: the routes and the settings do not change while it runs."""
    if "tinkerbell_openapi" not in current_app.extensions:
        current_app.extensions["tinkerbell_openapi"] = document(current_app)
    return jsonify(current_app.extensions["tinkerbell_openapi"])
