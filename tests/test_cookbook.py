"""tinker-cookbook 0.6.1, unmodified, against a stack on the default SmolLM2 model: supervised and math-RL trainers.

The client side runs offline: the tokenizer comes from `python -m backends.models install-tokenizer` into a
fresh HF cache, data from the cookbook's bundled conversations and the synthetic arithmetic environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tinker_cookbook

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
ROOT = Path(__file__).resolve().parent.parent
# `python -m tinker_cookbook.supervised.train` fails in 0.6.1 (nested entrypoint without an annotated argument).
SL_WRAPPER = """
import asyncio

import chz
from tinker_cookbook.supervised import train


def run(config: train.Config) -> None:
    asyncio.run(train.main(config))


if __name__ == "__main__":
    chz.nested_entrypoint(run)
"""


@pytest.fixture(scope="module")
def smol(make_stack, tmp_path_factory):
    stack = make_stack(1, {"TINKERBELL_AUTH": "off"}, base_model=DEFAULT_MODEL)
    hf_home = tmp_path_factory.mktemp("hf")
    env = {**stack.env, "HF_HOME": str(hf_home)}
    install = subprocess.run(
        [sys.executable, "-m", "backends.models", "install-tokenizer", "--model", DEFAULT_MODEL],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    client_env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "TINKER_API_KEY": "tml-cookbook",
        "TINKER_TELEMETRY": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return stack, client_env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> str:
    run = subprocess.run(args, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]
    assert "Training completed successfully" in output, output[-5000:]
    return output


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_supervised_trainer_runs_ten_steps_with_saves_and_sampler_nll_eval(smol, tmp_path):

    stack, env = smol
    (tmp_path / "sl_train.py").write_text(SL_WRAPPER)
    data = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    log_path = tmp_path / "sl-log"
    _run(
        [
            sys.executable,
            str(tmp_path / "sl_train.py"),
            "recipe_name=tinkerbell_test",
            f"model_name={DEFAULT_MODEL}",
            "renderer_name=qwen3_instruct",
            f"base_url={stack.url}",
            "dataset_builder=tinker_cookbook.supervised.data:FromConversationFileBuilder",
            f"dataset_builder.file_path={data}",
            "dataset_builder.test_size=4",
            f"dataset_builder.common_config.model_name_for_tokenizer={DEFAULT_MODEL}",
            "dataset_builder.common_config.renderer_name=qwen3_instruct",
            "dataset_builder.common_config.max_length=128",
            "dataset_builder.common_config.batch_size=2",
            "max_steps=10",
            "save_every=5",
            "eval_every=5",
            "lora_rank=8",
            f"log_path={log_path}",
        ],
        env,
        tmp_path,
    )

    metrics = _jsonl(log_path / "metrics.jsonl")
    train_steps = [m for m in metrics if "train_mean_nll" in m]
    assert len(train_steps) >= 10
    evals = [m["test/nll"] for m in metrics if "test/nll" in m]  # the sampler-based NLL evaluator (compute_logprobs)
    assert len(evals) >= 2 and all(0 < v < 20 for v in evals), evals
    checkpoints = {c["name"]: c for c in _jsonl(log_path / "checkpoints.jsonl")}
    assert "000005" in checkpoints and "final" in checkpoints, checkpoints
    periodic = checkpoints["000005"]
    assert "/weights/000005" in periodic["state_path"] and "/sampler_weights/000005" in periodic["sampler_path"]


def test_math_rl_trainer_runs_three_iterations_with_a_save_and_a_sampler_from_it(smol, tmp_path):
    stack, env = smol
    log_path = tmp_path / "rl-log"
    _run(
        [
            sys.executable,
            "-m",
            "tinker_cookbook.recipes.math_rl.train",
            f"model_name={DEFAULT_MODEL}",
            "renderer_name=qwen3_instruct",
            "env=arithmetic",
            "loss_fn=importance_sampling",
            "group_size=2",
            "groups_per_batch=2",
            "max_tokens=5",
            "max_steps=3",
            "eval_every=0",
            "save_every=2",
            "lora_rank=8",
            f"base_url={stack.url}",
            f"log_path={log_path}",
            "behavior_if_log_dir_exists=delete",
        ],
        env,
        tmp_path,
    )

    assert len(_jsonl(log_path / "metrics.jsonl")) >= 3
    checkpoints = {c["name"]: c for c in _jsonl(log_path / "checkpoints.jsonl")}
    assert "000002" in checkpoints, checkpoints
    saved_sampler = checkpoints["000002"]["sampler_path"]
    registry = stack.registry()
    session_id = saved_sampler[len("tinker://") :].split(":train:")[0]
    samplers = [registry.sampler(s, "local") for s in registry.session_children(session_id, "samplers")]
    assert saved_sampler in [s.get("model_path") for s in samplers], (
        "no sampling session was created from the saved path"
    )
