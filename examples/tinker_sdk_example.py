"""The official `tinker` SDK, unmodified, against Tinkerbell: a few SFT steps, a save, and sampling from the result.

export TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-…   # any tml- key when TINKERBELL_AUTH=off
python -m backends.models install-tokenizer      # once: the tokenizer into the local HF cache
HF_HUB_OFFLINE=1 python examples/tinker_sdk_example.py
"""

from __future__ import annotations

import os

import tinker
from tinker import types

BASE_MODEL = os.environ.get("TINKERBELL_EXAMPLE_MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")
STEPS = int(os.environ.get("TINKERBELL_EXAMPLE_STEPS", "5"))


def main() -> None:
    service = tinker.ServiceClient()  # base_url and api_key from TINKER_BASE_URL / TINKER_API_KEY
    training = service.create_lora_training_client(base_model=BASE_MODEL, rank=8)
    tokenizer = training.get_tokenizer()

    prompt = tokenizer.encode("Q: What is the capital of France?\nA:")
    answer = tokenizer.encode(" Paris.")
    tokens = prompt + answer
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [0.0] * (len(prompt) - 1) + [1.0] * len(answer)},
    )
    for step in range(STEPS):
        fwdbwd = training.forward_backward([datum], "cross_entropy")
        optim = training.optim_step(types.AdamParams(learning_rate=1e-3))
        print(f"step {step}: loss {fwdbwd.result().metrics['loss:sum']:.3f}")
        optim.result()

    print("saved", training.save_state("example").result().path)
    sampler = training.save_weights_and_get_sampling_client()
    result = sampler.sample(
        types.ModelInput.from_ints(prompt),
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=8, temperature=0.0),
    ).result()
    print("sample:", repr(tokenizer.decode(result.sequences[0].tokens)))
    service.close("success").result()


if __name__ == "__main__":
    main()
