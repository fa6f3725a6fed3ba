"""HFSamplingBackend: a plain KV-cache sampling loop on the shared base model, optionally with a saved LoRA adapter.

Sampled-token logprobs are log-softmax of the raw model distribution (temperature 1, before top-k/top-p), as
Tinker and vLLM's default "raw_logprobs" report them, whatever temperature was used to draw the token.
"""

from __future__ import annotations

import math
import secrets
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from backends.base import SampledSequence, SampleResult, SamplingSpec
from backends.hf import LoadedBase, get_base, memory_bytes, torch_device
from core.errors import UserError
from core.settings import Settings


def _filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(n, V) logits -> (n, V) sampling probabilities after temperature, top-k and top-p (nucleus)."""
    logits = logits / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (n, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (n, V)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly before each token; the top token always stays
        sorted_logits = sorted_logits.masked_fill(before > top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


class _StopChecker:
    """Per-sequence stop test on the generated tokens: stop ids, or stop strings on the decoded text."""

    def __init__(self, stop: list[str] | list[int] | None, base: LoadedBase) -> None:
        self.ids: set[int] = set()
        self.strings: list[str] = []
        if stop is None:
            self.ids = set(base.eos_ids)
        elif all(isinstance(s, str) for s in stop):
            self.strings = list(stop)  # type: ignore[arg-type]
        else:
            self.ids = {int(s) for s in stop}
        self.base = base
        # A stop string of L characters spans at most ~4L byte-level tokens; decode only that tail.
        self.window = 4 * max((len(s) for s in self.strings), default=0) + 4

    def __call__(self, tokens: list[int]) -> bool:
        if tokens[-1] in self.ids:
            return True
        if self.strings:
            text = self.base.tokenizer.decode(tokens[-self.window :], skip_special_tokens=False)
            return any(s in text for s in self.strings)
        return False


def _validate(prompt: list[int], params: SamplingSpec, num_samples: int, topk_prompt: int, base: LoadedBase) -> SamplingSpec:
    if not prompt:
        raise UserError("prompt: empty")
    for pos, tok in enumerate(prompt):
        if not isinstance(tok, int) or not 0 <= tok < base.vocab_in:
            raise UserError(f"prompt: token id {tok!r} at position {pos} is outside the vocabulary [0, {base.vocab_in})")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise UserError(f"num_samples: must be a positive integer, got {num_samples!r}")
    if not isinstance(topk_prompt, int) or not 0 <= topk_prompt <= base.vocab_out:
        raise UserError(f"topk_prompt_logprobs: must be between 0 and {base.vocab_out}, got {topk_prompt!r}")
    room = (base.max_len - len(prompt)) if base.max_len else None
    if room is not None and room < 0:
        raise UserError(f"prompt: {len(prompt)} tokens exceed the model's context length {base.max_len}")
    max_tokens = params.max_tokens if params.max_tokens is not None else (room if room is not None else 16)
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise UserError(f"sampling_params.max_tokens: must be a non-negative integer, got {params.max_tokens!r}")
    if room is not None and max_tokens > room:
        raise UserError(f"sampling_params.max_tokens: prompt ({len(prompt)}) + max_tokens ({max_tokens}) exceeds the context length {base.max_len}")
    t, p, k = params.temperature, params.top_p, params.top_k
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
        raise UserError(f"sampling_params.temperature: must be >= 0, got {t!r}")
    if not (isinstance(p, (int, float)) and 0 < p <= 1):
        raise UserError(f"sampling_params.top_p: must be in (0, 1], got {p!r}")
    if not isinstance(k, int) or k < -1:
        raise UserError(f"sampling_params.top_k: must be -1 (off) or a positive integer, got {k!r}")
    if params.seed is not None and not isinstance(params.seed, int):
        raise UserError(f"sampling_params.seed: must be an integer, got {params.seed!r}")
    stop = params.stop
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, (list, tuple)):
            raise UserError("sampling_params.stop: must be a string, a list of strings or a list of token ids")
        if not (all(isinstance(s, str) and s for s in stop) or all(isinstance(s, int) and not isinstance(s, bool) for s in stop)):
            raise UserError("sampling_params.stop: must be all non-empty strings or all token ids")
        stop = list(stop)
    return SamplingSpec(max_tokens=max_tokens, temperature=float(t), top_p=float(p), top_k=k, seed=params.seed, stop=stop)


class HFSamplingBackend:
    """SamplingBackend on HF transformers. Saved adapters are attached to the shared base model, LRU-cached by dir."""

    def __init__(self, settings: Settings, dtype: torch.dtype | None = None, max_adapters: int = 8) -> None:
        self.settings = settings
        self.device = torch_device(settings.device)
        self.dtype = dtype or torch.float32
        self.max_adapters = max_adapters
        # (base model, adapter dir, weights mtime, size) -> (base, internal adapter name)
        self._adapters: OrderedDict[tuple[str, str, int, int], tuple[LoadedBase, str]] = OrderedDict()

    def _adapter(self, base: LoadedBase, adapter_dir: str) -> str:
        from peft import LoraConfig
        from safetensors.torch import load_file

        directory = Path(adapter_dir)
        weights = directory / "adapter_model.safetensors"
        if not weights.is_file() or not (directory / "adapter_config.json").is_file():
            raise UserError(f"model_path: no sampler weights (adapter_model.safetensors + adapter_config.json) at {adapter_dir}")
        stat = weights.stat()
        key = (base.name, str(directory.resolve()), stat.st_mtime_ns, stat.st_size)
        if key in self._adapters:
            self._adapters.move_to_end(key)
            return self._adapters[key][1]
        try:
            config = LoraConfig.from_pretrained(str(directory))
            state = load_file(str(weights))
        except Exception as exc:
            raise UserError(f"model_path: unreadable adapter at {adapter_dir} ({exc})") from exc
        config.inference_mode = True
        state = {k: v for k, v in state.items() if ".lora_" in k}  # ignore saved base lm_head/embedding copies
        with base.lock:
            name = base.new_adapter(config, 0, prefix="sample")
            params = base.adapter_params(name)
            if set(params) != set(state) or any(tuple(state[k].shape) != tuple(p.shape) for k, p in params.items()):
                base.delete_adapter(name)
                raise UserError(f"model_path: adapter at {adapter_dir} does not fit base model {base.name!r}")
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(state[k].to(p.device, p.dtype))
                    p.requires_grad_(False)
        self._adapters[key] = (base, name)
        while len(self._adapters) > self.max_adapters:
            _, (old_base, old_name) = self._adapters.popitem(last=False)
            old_base.delete_adapter(old_name)
        return name

    def sample(
        self,
        base_model: str,
        adapter_dir: str | None,
        prompt: list[int],
        params: SamplingSpec,
        num_samples: int = 1,
        prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> SampleResult:
        """Sample num_samples continuations of prompt. seed fixes the tokens; temperature 0 is greedy."""
        base = get_base(base_model, self.settings, self.device, self.dtype)
        prompt = [int(t) if hasattr(t, "__index__") and not isinstance(t, bool) else t for t in prompt]  # numpy ints too
        spec = _validate(prompt, params, num_samples, topk_prompt_logprobs, base)
        name = self._adapter(base, adapter_dir) if adapter_dir else None
        with base.lock, torch.no_grad():
            base.activate(name)
            return self._generate(base, prompt, spec, num_samples, prompt_logprobs, topk_prompt_logprobs)

    def _generate(self, base: LoadedBase, prompt: list[int], spec: SamplingSpec, n: int, want_lp: bool, topk: int) -> SampleResult:
        ids = torch.tensor([prompt], dtype=torch.int64, device=self.device)  # (1, P)
        want_all = want_lp or topk > 0
        logits, cache = base.decode_step(ids, last_only=not want_all)
        logits = logits[0]  # (P, V), or (1, V) when prompt logprobs are not asked for
        result = SampleResult(sequences=[])
        if want_all:
            lsm = logits[:-1].float().log_softmax(-1)  # (P-1, V): row j predicts prompt[j+1]
            if want_lp:
                picked = lsm.gather(-1, ids[0, 1:, None]).squeeze(-1)  # (P-1,)
                result.prompt_logprobs = [None] + [float(v) for v in picked.tolist()]
            if topk:
                values, indices = lsm.topk(topk, dim=-1)  # (P-1, k)
                result.topk_prompt_logprobs = [[]] + [  # position 0 has no prediction: an empty row
                    list(zip(map(int, i_row), map(float, v_row))) for i_row, v_row in zip(indices.tolist(), values.tolist())
                ]
        next_logits = logits[-1:].float().expand(n, -1)  # (n, V)
        if n > 1 and spec.max_tokens > 1:
            cache.batch_repeat_interleave(n)  # share the prompt's KV cache across the n samples
        generator = torch.Generator(device=self.device)
        generator.manual_seed(spec.seed if spec.seed is not None else secrets.randbits(63))
        stop = _StopChecker(spec.stop, base)
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        done, reasons = [False] * n, ["length"] * n
        for step in range(spec.max_tokens):
            raw = next_logits.log_softmax(-1)  # (n, V) at temperature 1
            if spec.temperature == 0:
                chosen = next_logits.argmax(-1)  # (n,)
            else:
                probs = _filtered_probs(next_logits, spec.temperature, spec.top_k, spec.top_p)
                chosen = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (n,)
            chosen_lp = raw.gather(-1, chosen[:, None]).squeeze(1)  # (n,)
            for i, (tok, lp) in enumerate(zip(chosen.tolist(), chosen_lp.tolist())):
                if done[i]:
                    continue
                tokens[i].append(tok)
                logprobs[i].append(lp)
                if stop(tokens[i]):
                    done[i], reasons[i] = True, "stop"
            if all(done) or step == spec.max_tokens - 1:
                break
            step_logits, cache = base.decode_step(chosen[:, None], cache)  # (n, 1) -> (n, 1, V)
            next_logits = step_logits[:, -1].float()
        result.sequences = [SampledSequence(tokens=t, logprobs=lp, stop_reason=r) for t, lp, r in zip(tokens, logprobs, reasons)]
        return result

    def status(self) -> dict[str, Any]:
        return {"device": str(self.device), "cached_adapters": len(self._adapters), "memory_bytes": memory_bytes(self.device)}
