"""DPO with a custom loss: (chosen, rejected) pairs, reference logprobs passed in loss_fn_inputs.

`python examples/custom_loss_dpo.py --url http://localhost:8000 --api-key tml-…` (the key needs the custom_code
scope and the service TINKERBELL_ALLOW_CUSTOM_CODE=1; see CUSTOM_LOSS_GUIDE.md).
"""

from __future__ import annotations

import torch.nn.functional as F
from custom_loss_common import datum, logprobs_of, parse_args, tokenizer, train

from client import LossFnOutput, TinkerbellClient, custom_loss

PAIRS = [  # (prompt, chosen, rejected)
    ("Q: What is the capital of France?\nA:", " Paris.", " London."),
    ("Q: What is 2 + 2?\nA:", " 4.", " 5."),
    ("Q: Which planet do we live on?\nA:", " Earth.", " Mars."),
    ("Q: What colour is the clear daytime sky?\nA:", " Blue.", " Green."),
]


def main() -> None:
    args = parse_args(__doc__, steps=10)
    client = TinkerbellClient(args.url, api_key=args.api_key)

    @custom_loss(client, name="dpo")
    def dpo_loss(model_outputs, loss_fn_inputs, attention_mask, beta=0.1):
        """DPO (Rafailov et al. 2023). Datums come in (chosen, rejected) pairs: 0/1, 2/3, …

        loss_fn_inputs: weights (B, T) 1 on completion tokens; ref_logprobs (B, T) the reference model's logprobs.
        """
        weights = loss_fn_inputs["weights"] * attention_mask  # (B, T)
        policy = (model_outputs["logprobs"] * weights).sum(-1)  # (B,) sequence logprob of the completion
        reference = (loss_fn_inputs["ref_logprobs"] * weights).sum(-1)  # (B,)
        ratio = (policy - reference).view(-1, 2)  # (P, 2): chosen, rejected
        logits = beta * (ratio[:, 0] - ratio[:, 1])  # (P,)
        loss = -F.logsigmoid(logits).sum()
        return LossFnOutput(
            loss=loss, diagnostics={"accuracy:mean": (logits > 0).float().mean(), "margin:mean": logits.mean() / beta}
        )

    encode = tokenizer(args.base_model)
    data = []
    for prompt, chosen, rejected in PAIRS:
        data += [datum(encode(prompt), encode(chosen)), datum(encode(prompt), encode(rejected))]
    model_id = client.add_lora(base_model=args.base_model, rank=args.rank, seed=0).result(300)["model_id"]
    # The reference is the adapter before training (a fresh LoRA is the base model): one forward pass, kept fixed.
    reference = client.forward(model_id, data).result(120)["loss_fn_outputs"]
    for d, ref in zip(data, reference):
        d["loss_fn_inputs"]["ref_logprobs"] = logprobs_of(ref)
    metrics = train(client, model_id, data, "dpo", {"beta": 0.1}, args.steps, args.learning_rate)
    print(f"final: accuracy {metrics['accuracy:mean']:.2f}, margin {metrics['margin:mean']:.3f} nats")
    client.remove_lora(model_id)  # free the adapter on the service


if __name__ == "__main__":
    main()
