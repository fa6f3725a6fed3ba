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
) -> dict[str, Any]:
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
    )
    result: SampleResult = runtime.engine.run(Work(SAMPLE, request, tokens=len(tokens)))
    runtime.after_result(stats={"tokens_sampled": sum(len(s.tokens) for s in result.sequences)})
    out: dict[str, Any] = {
        "sequences": [
            {
                "tokens": encode_array(s.tokens, "int64"),
                "logprobs": encode_array(s.logprobs, "float32"),
                "stop_reason": s.stop_reason,
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
    return out
