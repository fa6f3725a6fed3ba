"""Sampling task: consumed from sample.<base_model> by every worker serving that base model."""

from __future__ import annotations

from typing import Any

from backends.base import SamplingSpec
from core.errors import UserError
from core.wire import decode_array, encode_array
from tasks.celery_app import app
from tasks.runtime import runtime


@app.task(name="tinkerbell.sample", bind=True, throws=(UserError,))
def sample(self: Any, base_model: str, adapter_dir: str | None, prompt: dict[str, Any], sampling_params: dict[str, Any], num_samples: int = 1, prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0) -> dict[str, Any]:
    tokens = [int(t) for t in decode_array(prompt)]
    result = runtime.sampling.sample(base_model, adapter_dir, tokens, SamplingSpec(**sampling_params), num_samples, prompt_logprobs, topk_prompt_logprobs)
    runtime.after_result(stats={"tokens_sampled": sum(len(s.tokens) for s in result.sequences)})
    out: dict[str, Any] = {
        "sequences": [
            {"tokens": encode_array(s.tokens, "int64"), "logprobs": encode_array(s.logprobs, "float32"), "stop_reason": s.stop_reason}
            for s in result.sequences
        ],
        "prompt_logprobs": None,
        "topk_prompt_logprobs": None,
    }
    if result.prompt_logprobs is not None:
        out["prompt_logprobs"] = encode_array([float("nan") if v is None else v for v in result.prompt_logprobs], "float32")
    if result.topk_prompt_logprobs is not None:
        out["topk_prompt_logprobs"] = [[[int(t), float(lp)] for t, lp in row] for row in result.topk_prompt_logprobs]
    return out
