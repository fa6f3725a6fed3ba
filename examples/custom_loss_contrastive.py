"""A contrastive (InfoNCE) loss: for each prompt, raise the positive completion's logprob against K negatives.

`python examples/custom_loss_contrastive.py --url http://localhost:8000 --api-key tml-…` (see CUSTOM_LOSS_GUIDE.md).
"""

from __future__ import annotations

import torch
from custom_loss_common import datum, parse_args, tokenizer, train

from client import LossFnOutput, TinkerbellClient, custom_loss

GROUPS = [  # (prompt, positive, negatives…): every group has the same size
    ("The opposite of hot is", " cold.", " warm.", " loud.", " green."),
    ("A baby cat is called a", " kitten.", " puppy.", " calf.", " chick."),
    ("Water freezes at zero degrees", " Celsius.", " Kelvin.", " north.", " slowly."),
]


def main() -> None:
    args = parse_args(__doc__, steps=10)
    client = TinkerbellClient(args.url, api_key=args.api_key)

    @custom_loss(client, name="info_nce")
    def info_nce(model_outputs, loss_fn_inputs, attention_mask, group_size=4, temperature=1.0):
        """InfoNCE over completions: datums come in groups of group_size, the first one positive.

        Scores are mean per-token logprobs of each completion (weights mark it), so lengths do not dominate.
        """
        weights = loss_fn_inputs["weights"] * attention_mask  # (B, T)
        score = (model_outputs["logprobs"] * weights).sum(-1) / weights.sum(-1).clamp(min=1)  # (B,)
        logits = score.view(-1, group_size) / temperature  # (G, group_size)
        target = torch.zeros(logits.shape[0], dtype=torch.long)  # the positive is first
        loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        top1 = (logits.argmax(-1) == 0).float().mean()
        return LossFnOutput(
            loss=loss, diagnostics={"top1:mean": top1, "positive_score:mean": score.view(-1, group_size)[:, 0].mean()}
        )

    encode = tokenizer(args.base_model)
    data = [datum(encode(prompt), encode(c)) for prompt, *completions in GROUPS for c in completions]
    model_id = client.add_lora(base_model=args.base_model, rank=args.rank, seed=0).result(300)["model_id"]
    metrics = train(
        client,
        model_id,
        data,
        "info_nce",
        {"group_size": len(GROUPS[0]) - 1, "temperature": 0.5},
        args.steps,
        args.learning_rate,
    )
    print(f"final: positive ranked first in {metrics['top1:mean']:.0%} of groups")
    client.remove_lora(model_id)  # free the adapter on the service


if __name__ == "__main__":
    main()
