"""KL-regularised SFT: cross-entropy on the completion plus beta times a KL penalty towards a frozen reference.

`python examples/custom_loss_kl_sft.py --url http://localhost:8000 --api-key tml-…` (see CUSTOM_LOSS_GUIDE.md).
"""

from __future__ import annotations

import torch
from custom_loss_common import datum, logprobs_of, parse_args, tokenizer, train

from client import LossFnOutput, TinkerbellClient, custom_loss

EXAMPLES = [
    ("User: Say hello like a pirate.\nAssistant:", " Ahoy, matey!"),
    ("User: Say goodbye like a pirate.\nAssistant:", " Fair winds, matey!"),
    ("User: Say thanks like a pirate.\nAssistant:", " Much obliged, matey!"),
]


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(r) - r - 1 with r = ref - policy; >= 0, unbiased on
    policy samples."""
    r = ref_logprobs - logprobs
    return torch.exp(r) - r - 1


def main() -> None:
    args = parse_args(__doc__, steps=10)
    client = TinkerbellClient(args.url, api_key=args.api_key)

    @custom_loss(client, name="kl_sft")
    def kl_sft(model_outputs, loss_fn_inputs, attention_mask, beta=0.1):
        """Summed NLL of the completion tokens + beta * summed per-token KL estimate (kl_k3, a helper that travels
        along)."""
        weights = loss_fn_inputs["weights"] * attention_mask  # (B, T)
        logprobs = model_outputs["logprobs"]  # (B, T)
        nll = -(logprobs * weights).sum()
        kl = (kl_k3(logprobs, loss_fn_inputs["ref_logprobs"]) * weights).sum()
        tokens = weights.sum().clamp(min=1)
        return LossFnOutput(loss=nll + beta * kl, diagnostics={"nll:sum": nll, "kl_per_token:mean": kl / tokens})

    encode = tokenizer(args.base_model)
    data = [datum(encode(prompt), encode(completion)) for prompt, completion in EXAMPLES]
    model_id = client.add_lora(base_model=args.base_model, rank=args.rank, seed=0).result(300)["model_id"]
    reference = client.forward(model_id, data).result(120)["loss_fn_outputs"]  # the base model, frozen
    for d, ref in zip(data, reference):
        d["loss_fn_inputs"]["ref_logprobs"] = logprobs_of(ref)
    metrics = train(client, model_id, data, "kl_sft", {"beta": 0.5}, args.steps, args.learning_rate)
    print(f"final: nll {metrics['nll:sum']:.3f}, KL per token {metrics['kl_per_token:mean']:.4f}")
    client.remove_lora(model_id)  # free the adapter on the service


if __name__ == "__main__":
    main()
