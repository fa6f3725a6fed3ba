"""The README's demo (`make demo`): start the local stack, LoRA-fine-tune SmolLM2-135M-Instruct through the official
`tinker` SDK on a small bundled chat dataset, show a greedy sample before and after, and plot the loss curve.

`python examples/demo.py [--steps 30] [--keep-running] [--url http://host:port]`; see --help.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TINKER_TELEMETRY", "0")

from core.settings import DEFAULT_BASE_MODEL

DATA = REPO_ROOT / "examples" / "data" / "demo_sft.jsonl"
HELD_OUT = "What is the capital of France?"  # not in the dataset; its style is
DEMO_KEY = "tml-demo"  # single-user mode (TINKERBELL_AUTH=off) accepts any tml- key


def install_tokenizer(base_model: str) -> None:
    """Put the base model's tokenizer in the local HF cache, where the SDK's get_tokenizer() looks (offline)."""
    subprocess.run(
        [sys.executable, "-m", "backends.models", "install-tokenizer", "--model", base_model],
        cwd=REPO_ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def load_conversations(path: Path) -> list[list[dict[str, str]]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["messages"] for line in f if line.strip()]


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return list(tokenizer.encode(text, add_special_tokens=False))


def make_datum(tokenizer: Any, messages: list[dict[str, str]]) -> Any:
    """Next-token prediction on the assistant's reply only: prompt tokens get weight 0."""
    import tinker

    prompt = render(tokenizer, messages[:-1], generation_prompt=True)
    full = render(tokenizer, messages, generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise ValueError("chat template: the prompt is not a prefix of the full conversation")
    weights = [0.0] * len(prompt) + [1.0] * (len(full) - len(prompt))
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={"target_tokens": full[1:], "weights": weights[1:]},
    )


def greedy(sampler: Any, tokenizer: Any, question: str, max_tokens: int = 48) -> str:
    import tinker
    from tinker import types

    prompt = render(tokenizer, [{"role": "user", "content": question}], generation_prompt=True)
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    params = types.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, stop=[t for t in dict.fromkeys(stop) if isinstance(t, int)]
    )
    result = sampler.sample(tinker.ModelInput.from_ints(prompt), num_samples=1, sampling_params=params).result(
        timeout=600
    )
    return tokenizer.decode(result.sequences[0].tokens, skip_special_tokens=True).strip()


def plot(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per target token")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fine_tune(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """The part a researcher writes: plain `tinker` SDK calls against base_url."""
    import tinker
    from tinker import types
    from tqdm import tqdm

    service = tinker.ServiceClient(base_url=url, api_key=args.api_key)
    training = service.create_lora_training_client(base_model=args.base_model, rank=args.rank, seed=0).result(
        timeout=600
    )
    tokenizer = training.get_tokenizer()
    data = [make_datum(tokenizer, messages) for messages in load_conversations(args.data)]
    print(
        f"dataset: {len(data)} conversations from "
        f"{args.data.relative_to(REPO_ROOT) if args.data.is_relative_to(REPO_ROOT) else args.data}"
    )

    base_sampler = service.create_sampling_client(base_model=args.base_model).result(timeout=600)
    before = greedy(base_sampler, tokenizer, args.prompt)
    print(f"\nbefore training  Q: {args.prompt}\n                 A: {before}\n")

    rng = random.Random(0)
    order: list[int] = []
    losses: list[float] = []
    adam = types.AdamParams(learning_rate=args.lr)
    started = time.perf_counter()
    trained_tokens = 0
    with tqdm(total=args.steps, unit="step", dynamic_ncols=True, desc="fine-tuning") as bar:
        for _ in range(args.steps):
            if len(order) < args.batch_size:
                order += rng.sample(range(len(data)), len(data))
            batch = [data[i] for i in order[: args.batch_size]]
            del order[: args.batch_size]
            step_start = time.perf_counter()
            fwdbwd = training.forward_backward(batch, "cross_entropy")
            step = training.optim_step(adam)
            output = fwdbwd.result(timeout=600)
            step.result(timeout=600)
            elapsed = time.perf_counter() - step_start
            tokens = sum(d.model_input.length for d in batch)
            targets = sum(float(sum(d.loss_fn_inputs["weights"].tolist())) for d in batch)
            losses.append(output.metrics["loss:sum"] / max(targets, 1.0))
            trained_tokens += tokens
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / elapsed:.0f}")
            bar.update(1)
    seconds = time.perf_counter() - started

    after_sampler = training.save_weights_and_get_sampling_client(name="demo-after").result(timeout=600)
    after = greedy(after_sampler, tokenizer, args.prompt)
    print(f"\nafter training   Q: {args.prompt}\n                 A: {after}\n")
    plot(
        losses,
        args.plot,
        f"{args.base_model.split('/')[-1]}: LoRA rank {args.rank}, lr {args.lr:g}, {args.batch_size} "
        "conversations/step",
    )
    return {"before": before, "after": after, "losses": losses, "tokens": trained_tokens, "seconds": seconds}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--steps", type=int, default=16, help="optimizer steps (default 16: a few minutes on 2 CPU cores)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="conversations per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--data", type=Path, default=DATA, help="JSONL of {'messages': [user, assistant]}")
    parser.add_argument("--prompt", default=HELD_OUT, help="held-out question sampled before and after")
    parser.add_argument("--base-model", default=os.environ.get("TINKERBELL_BASE_MODEL", DEFAULT_BASE_MODEL))
    parser.add_argument("--plot", type=Path, default=REPO_ROOT / "logs" / "demo_loss.png", help="loss-curve PNG")
    parser.add_argument("--keep-running", action="store_true", help="leave the stack up afterwards (Ctrl-C stops it)")
    parser.add_argument(
        "--url", default=None, help="use an already running Tinkerbell at this URL instead of starting one"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("TINKER_API_KEY", DEMO_KEY),
        help="API key (the demo's own stack runs with auth off)",
    )
    parser.add_argument(
        "--port", type=int, default=None, help="API port of the demo stack (default TINKERBELL_PORT or 8000)"
    )
    parser.add_argument(
        "--redis-port",
        type=int,
        default=None,
        help="start (or reuse) Redis on this port (default: TINKERBELL_BROKER_URL)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="workers: one per GPU by default, else one CPU worker"
    )
    parser.add_argument("--cpu", action="store_true", help="CPU workers even when GPUs are present")
    parser.add_argument(
        "--flower-port",
        type=int,
        default=None,
        help="Flower port of the demo stack (default TINKERBELL_FLOWER_PORT or 5555)",
    )
    parser.add_argument("--no-flower", action="store_true", help="do not start Flower")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` stops the stack too (the finally below)
    logging.getLogger("tinker.lib.api_future_impl").setLevel(
        logging.ERROR
    )  # a "Retrying … try_again" line per long-poll
    print(f"installing the {args.base_model} tokenizer into the local Hugging Face cache …")
    install_tokenizer(args.base_model)
    stack = None
    if args.url is None:
        from scripts import stack as stacklib

        log_path = REPO_ROOT / "logs" / "stack.log"
        print(
            f"starting the local stack (logs: {log_path.relative_to(REPO_ROOT)}; the first start converts the model, "
            "~30 s) …"
        )
        environ = {**os.environ, "TINKERBELL_AUTH": "off", "TINKERBELL_BASE_MODEL": args.base_model}
        try:
            stack = stacklib.start_stack(
                workers=args.workers,
                cpu=args.cpu,
                port=args.port,
                redis_port=args.redis_port,
                flower=not args.no_flower,
                flower_port=args.flower_port,
                environ=environ,
                log_path=log_path,
                echo=None,
            )
        except stacklib.StackError as exc:
            print(f"could not start the stack: {exc}", file=sys.stderr)
            if log_path.exists():
                print("".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-30:]), file=sys.stderr)
            return 1
        for line in stack.banner():
            if not line.startswith("Ctrl-C"):
                print(line)
        url = stack.api_url
    else:
        url = args.url.rstrip("/")
    try:
        result = fine_tune(url, args)
        losses = result["losses"]
        print(
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps, {result['tokens']} tokens in "
            f"{result['seconds']:.0f} s ({result['tokens'] / result['seconds']:.0f} tokens/s)"
        )
        print(f"loss curve: {args.plot}")
        if stack is not None and args.keep_running:
            print(
                f"\nThe stack keeps running: status page {url}/ , Flower {stack.flower_url or '(off)'}. Ctrl-C stops "
                "it."
            )
            stop = {"requested": False}
            signal.signal(signal.SIGINT, lambda *_: stop.update(requested=True))
            signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
            stack.wait(lambda: stop["requested"])
        return 0
    finally:
        if stack is not None:
            print("stopping the stack …")
            stack.stop()


if __name__ == "__main__":
    sys.exit(main())
