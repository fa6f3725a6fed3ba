"""Sampling task: consumed from sample.<base_model> by every worker serving that base model.

The body decodes the prompt and hands the request to the engine, which decodes every sample request it holds
for the same base model in one generation loop (SamplingBackend.sample_batch).
"""

from __future__ import annotations

from typing import Any

from backends.base import SampleRequest, SampleResult, SamplingSpec
from core.errors import UserError
from core.wire import decode_array, encode_array, encode_topk
from tasks.celery_app import app
from tasks.engine import SAMPLE, Work
from tasks.runtime import runtime


@app.task(name="tinkerbell.sample", throws=(UserError,))
def sample(
    base_model: str,
    adapter_dir: str | None,
    prompt: dict[str, Any],
    sampling_params: dict[str, Any],
    num_samples: int = 1,
    prompt_logprobs: bool = False,
    topk_prompt_logprobs: int = 0,
    topk_sample_logprobs: int = 0,
    target_prompt_logprobs: dict[str, Any] | None = None,
    prompt_alt_tokens_k: int = 0,
) -> dict[str, Any]:
    """target_prompt_logprobs: as api.datums.target_prompt_cells makes it ("cells": (m, 2) [row, token id], and the
    answer's layout); the answer is that layout with "values" (m,) in place of "cells"."""
    runtime.check_served(base_model)
    tokens = [int(t) for t in decode_array(prompt)]
    request = SampleRequest(
        base_model,
        adapter_dir,
        tokens,
        SamplingSpec(**sampling_params),
        num_samples,
        prompt_logprobs,
        topk_prompt_logprobs,
        topk_sample_logprobs,
        decode_array(target_prompt_logprobs["cells"]) if target_prompt_logprobs else None,
        prompt_alt_tokens_k,
    )
    result: SampleResult = runtime.engine.run(Work(SAMPLE, request, tokens=len(tokens)))
    runtime.after_result(stats={"tokens_sampled": sum(len(s.tokens) for s in result.sequences)})
    out: dict[str, Any] = {
        "sequences": [
            {
                "tokens": encode_array(s.tokens, "int64"),
                "logprobs": encode_array(s.logprobs, "float32"),
                "stop_reason": s.stop_reason,
                **({"topk_logprobs": encode_topk(s.topk_logprobs)} if s.topk_logprobs is not None else {}),
            }
            for s in result.sequences
        ],
        "prompt_logprobs": None,
        "topk_prompt_logprobs": None,
    }
    if result.prompt_logprobs is not None:
        out["prompt_logprobs"] = encode_array(
            [float("nan") if v is None else v for v in result.prompt_logprobs], "float32"
        )
    if result.topk_prompt_logprobs is not None:
        out["topk_prompt_logprobs"] = encode_topk(result.topk_prompt_logprobs)  # two [N, k] arrays (rule 4)
    if target_prompt_logprobs and result.target_prompt_logprobs is not None:
        layout = {k: v for k, v in target_prompt_logprobs.items() if k != "cells"}
        out["target_prompt_logprobs"] = {**layout, "values": encode_array(result.target_prompt_logprobs, "float32")}
    if result.prompt_alt_tokens is not None and result.prompt_alt_logprobs is not None:
        out["prompt_alt_tokens"] = {
            "tokens": encode_array(result.prompt_alt_tokens, "int64"),
            "logprobs": encode_array(result.prompt_alt_logprobs, "float32"),
        }
    return out
