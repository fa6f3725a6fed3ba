"""The seam between tasks/ and the model code: TrainingBackend and SamplingBackend, plus their plain-data specs.

Tasks only ever talk to these interfaces; `backends.loader` picks the concrete class from settings.
Arrays inside these specs are numpy (decoded from the wire by tasks/); results are numpy too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class LoraSpec:
    """Tinker LoraConfig plus alpha. Which modules get LoRA follows the train_* switches."""

    rank: int = 32
    alpha: float = 32.0  # PEFT scale = alpha / rank
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True


@dataclass(frozen=True)
class AdamSpec:
    """Tinker AdamParams."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass
class Datum:
    """One training example. tokens: (N,) int64 model input; loss_fn_inputs: e.g. target_tokens (N,) or (N,K),
    weights (N,)."""

    tokens: np.ndarray
    loss_fn_inputs: dict[str, np.ndarray]


@dataclass
class FwdBwdRequest:
    """One adapter's forward(+backward) request. Several may be passed to one backend call."""

    model_id: str
    data: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, Any] = field(default_factory=dict)
    forward_only: bool = False


@dataclass
class FwdBwdResult:
    """loss_fn_outputs: one dict per datum, each with "logprobs" shaped like target_tokens (float32).
    metrics: keys are "name:reduction" (e.g. "loss:sum")."""

    loss_fn_outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float]


@dataclass(frozen=True)
class SamplingSpec:
    """Tinker SamplingParams. stop: None (stop at EOS), list of strings or list of token ids ([] = never stop)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] | list[int] | None = None


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" | "length"
    topk_logprobs: list[list[tuple[int, float]]] | None = None  # k (token, logprob) per sampled token, if asked


@dataclass
class SampleRequest:
    """One sample call, as the engine hands a batch of them to SamplingBackend.sample_batch.

    adapter_dir: saved sampler weights (PEFT format) or None for the base model.
    target_prompt_cells: (n, 2) int64 cells [row i, token id] of Tinker's target_prompt_logprobs: the logprob of that
    token at prompt position i + 1 is asked for (token id -1: nothing; its answer is 0.0).
    prompt_alt_tokens_k: draws per prompt position after the first, at the request's temperature.
    """

    base_model: str
    adapter_dir: str | None
    prompt: list[int]
    params: SamplingSpec
    num_samples: int = 1
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_cells: np.ndarray | list[list[int]] | None = None
    prompt_alt_tokens_k: int = 0


@dataclass
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None  # position 0 is None
    topk_prompt_logprobs: list[list[tuple[int, float]]] | None = (
        None  # k (token, logprob) per position; position 0 is []
    )
    target_prompt_logprobs: np.ndarray | None = None  # (n,) float32, one per target_prompt_cells row (0.0 for -1)
    prompt_alt_tokens: np.ndarray | None = None  # (len(prompt) - 1, k) int64: row i draws for prompt position i + 1
    prompt_alt_logprobs: np.ndarray | None = None  # (len(prompt) - 1, k) float32: raw logprob of each draw


class TrainingBackend(Protocol):
    """Owns adapters (LoRA weights, optimizer state, accumulated gradients) on one device."""

    def create_adapter(self, model_id: str, base_model: str, lora: LoraSpec) -> dict[str, Any]: ...

    def remove_adapter(self, model_id: str) -> None: ...

    def has_adapter(self, model_id: str) -> bool: ...

    def forward_backward(self, requests: list[FwdBwdRequest]) -> list[FwdBwdResult | Exception]:
        """Many adapters' requests in one pass. Per-request failures (UserError for bad input, a non-finite loss, a
        custom loss that raises) are returned in that request's slot and leave every other request, and every
        adapter's gradients, exactly as if the failed one had not been in the batch."""
        ...

    def optim_step(self, model_id: str, adam: AdamSpec) -> dict[str, float]: ...

    def optim_steps(self, steps: list[tuple[str, AdamSpec]]) -> list[dict[str, float] | Exception]:
        """Several adapters' optimizer steps together; per-step failures in their slot."""
        ...

    def discard_gradients(self, model_id: str) -> None: ...

    def save_state(self, model_id: str, directory: str, with_optimizer: bool) -> int: ...

    def load_state(self, model_id: str, directory: str, with_optimizer: bool) -> None: ...

    def status(self) -> dict[str, Any]: ...


class SamplingBackend(Protocol):
    """Samples from a base model, optionally with LoRA weights saved by a TrainingBackend."""

    def sample(
        self,
        base_model: str,
        adapter_dir: str | None,
        prompt: list[int],
        params: SamplingSpec,
        num_samples: int = 1,
        prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> SampleResult: ...

    def sample_batch(self, requests: list[SampleRequest]) -> list[SampleResult | Exception]:
        """Many sample calls (same or different base models / adapters) decoded together where possible;
        per-request failures (UserError) in their slot, the others unaffected."""
        ...
