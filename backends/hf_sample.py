"""HFSamplingBackend: many sample requests decoded together on the shared base model, each with its own saved adapter.

Sampled-token logprobs are log-softmax of the raw model distribution (temperature 1, before top-k/top-p), as
Tinker and vLLM's default "raw_logprobs" report them, whatever temperature was used to draw the token.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Generator
from pathlib import Path
from typing import Any

import torch

from backends.base import SampleRequest, SampleResult, SamplingSpec
from backends.hf import LoadedBase, get_base, loaded_models, memory_bytes, settings_dtype, torch_device
from backends.hf_generate import GenJob, drain, generate_steps
from backends.sample_checks import plain_tokens, validate, validate_extras
from core.errors import UserError
from core.settings import Settings

log = logging.getLogger(__name__)


class HFSamplingBackend:
    """SamplingBackend on HF transformers. Saved adapters are attached to the shared base model, LRU-cached by dir.

    sample_batch decodes requests for one base model together, at most settings.engine_sample_rows sequences per
    generation loop; last_batch counts what the latest call did.
    """

    def __init__(self, settings: Settings, dtype: torch.dtype | None = None, max_adapters: int = 8) -> None:
        self.settings = settings
        self.device = torch_device(settings.device)
        self.dtype = settings_dtype(settings, dtype)  # the trainer's dtype too, so both share one LoadedBase
        self.max_adapters = max_adapters
        # (base model, adapter dir, weights mtime, size) -> (base, internal adapter name)
        self._adapters: OrderedDict[tuple[str, str, int, int], tuple[LoadedBase, str]] = OrderedDict()
        self.last_batch: dict[str, int] = {"requests": 0, "rows": 0, "loops": 0}

    def _adapter(self, base: LoadedBase, adapter_dir: str) -> str:
        """The adapter name on `base` for the sampler weights in adapter_dir, loading them on first use."""
        from peft import LoraConfig
        from safetensors.torch import load_file

        directory = Path(adapter_dir)
        weights = directory / "adapter_model.safetensors"
        if not weights.is_file() or not (directory / "adapter_config.json").is_file():
            raise UserError(
                f"model_path: no sampler weights (adapter_model.safetensors + adapter_config.json) at {adapter_dir}"
            )
        stat = weights.stat()
        key = (base.name, str(directory.resolve()), stat.st_mtime_ns, stat.st_size)
        if key in self._adapters and self._adapters[key][0] is base:
            self._adapters.move_to_end(key)
            return self._adapters[key][1]
        self._adapters.pop(key, None)  # loaded on a copy of the base model since unloaded (get_base)
        try:
            config = LoraConfig.from_pretrained(str(directory))
            state = load_file(str(weights))
        except Exception as exc:
            raise UserError(f"model_path: unreadable adapter at {adapter_dir} ({exc})") from exc
        targets = config.target_modules
        if (
            isinstance(targets, str)
            or not targets
            or config.use_dora
            or config.use_rslora
            or config.rank_pattern
            or config.alpha_pattern
        ):
            raise UserError(
                f"model_path: adapter at {adapter_dir} uses LoRA options the sampler does not support (plain LoRA on "
                "named modules only)"
            )
        state = {k: v for k, v in state.items() if ".lora_" in k}  # ignore saved base lm_head/embedding copies
        name = base.unique_name("sample")
        with base.lock:
            try:
                params = base.add_adapter(name, int(config.r), float(config.lora_alpha), sorted(targets), 0)
            except ValueError as exc:  # no module of this base matches the adapter's targets
                message = f"model_path: adapter at {adapter_dir} does not fit base model {base.name!r} ({exc})"
                raise UserError(message) from exc
            if set(params) != set(state) or any(tuple(state[k].shape) != tuple(p.shape) for k, p in params.items()):
                base.remove_adapter(name)
                raise UserError(f"model_path: adapter at {adapter_dir} does not fit base model {base.name!r}")
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(state[k].to(p.device, p.dtype))
                    p.requires_grad_(False)
        self._adapters[key] = (base, name)
        return name

    def _evict(self) -> None:
        """Drop least recently used sampler adapters beyond max_adapters; only after a call's loops, which may use
        more than max_adapters between them."""
        for key in [key for key, (old_base, _) in self._adapters.items() if old_base.unloaded]:
            del self._adapters[key]
        while len(self._adapters) > self.max_adapters:
            _, (old_base, old_name) = self._adapters.popitem(last=False)
            old_base.remove_adapter(old_name)

    def _job(self, base: LoadedBase, request: SampleRequest) -> GenJob:
        """Validate one request and attach its adapter; raises UserError naming the field."""
        prompt: list[int] = plain_tokens(list(request.prompt))  # type: ignore[assignment]  # validate checks them
        spec = validate(prompt, request.params, request.num_samples, request.topk_prompt_logprobs, base)
        cells = validate_extras(request, base)
        adapter = self._adapter(base, request.adapter_dir) if request.adapter_dir else None
        return GenJob(
            prompt,
            spec,
            request.num_samples,
            adapter,
            prompt_logprobs=bool(request.prompt_logprobs),
            topk_prompt_logprobs=request.topk_prompt_logprobs,
            time_limit_s=self.settings.sample_time_limit_s,
            topk_sample_logprobs=request.topk_sample_logprobs,
            target_prompt_cells=cells,
            prompt_alt_tokens_k=request.prompt_alt_tokens_k,
        )

    def sample_batch(self, requests: list[SampleRequest]) -> list[SampleResult | Exception]:
        """Decode the requests together, one group per base model, each group in loops of at most engine_sample_rows
        sequences. A request that fails validation gets its UserError in its slot; the others run."""
        return drain(self.sample_steps(requests))

    def sample_steps(self, requests: list[SampleRequest]) -> Generator[None, None, list[SampleResult | Exception]]:
        """sample_batch, yielding between decode steps so the engine runs training in between (a long sample
        batch does not hold an adapter's forward_backward back for its whole length)."""
        results: list[SampleResult | Exception | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(request.base_model, []).append(i)
        cap = max(1, int(self.settings.engine_sample_rows))
        rows = loops = 0
        for base_model, indices in groups.items():
            try:
                base = get_base(base_model, self.settings, self.device, self.dtype)
            except UserError as exc:
                for i in indices:
                    results[i] = exc
                continue
            jobs: list[tuple[int, GenJob]] = []
            for i in indices:
                try:
                    jobs.append((i, self._job(base, requests[i])))
                except UserError as exc:
                    results[i] = exc
            jobs.sort(key=lambda item: item[1].adapter or "")  # an adapter's rows side by side: one LoRA run each
            base.sampling += 1  # never unloaded mid-loop (another group's or a training call's get_base)
            try:
                for chunk in _pack(jobs, cap):
                    loops += 1
                    rows += sum(job.num_samples for _, job in chunk)
                    try:
                        outs: list[SampleResult | Exception] = yield from generate_steps(base, [j for _, j in chunk])
                    except Exception as exc:  # not the user's: the whole loop failed, other loops still run
                        log.exception("generation loop failed for %d request(s) on %s", len(chunk), base_model)
                        outs = [exc] * len(chunk)
                    for (i, _), out in zip(chunk, outs):
                        results[i] = out
            finally:
                base.sampling -= 1
                base.touch()  # sampled from just now: idle only TINKERBELL_MODEL_IDLE_S from here
            self._evict()
        self.last_batch = {"requests": len(requests), "rows": rows, "loops": loops}
        return results  # type: ignore[return-value]  # every slot is filled above

    def sample(
        self,
        base_model: str,
        adapter_dir: str | None,
        prompt: list[int],
        params: SamplingSpec,
        num_samples: int = 1,
        prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        **extras: Any,
    ) -> SampleResult:
        """Sample num_samples continuations of prompt. seed fixes the tokens; temperature 0 is greedy.
        extras: SampleRequest's topk_sample_logprobs, target_prompt_cells, prompt_alt_tokens_k."""
        request = SampleRequest(
            base_model, adapter_dir, prompt, params, num_samples, prompt_logprobs, topk_prompt_logprobs, **extras
        )
        [result] = self.sample_batch([request])
        if isinstance(result, Exception):
            raise result
        return result

    def status(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "cached_adapters": len(self._adapters),
            "base_models": sorted(loaded_models(self.device)),
            "model_bytes": loaded_models(self.device),
            "memory_bytes": memory_bytes(self.device),
        }


def _pack(jobs: list[tuple[int, GenJob]], cap: int) -> list[list[tuple[int, GenJob]]]:
    """Split jobs, in order, into loops of at most `cap` rows; a job with more samples than cap gets a loop alone."""
    chunks: list[list[tuple[int, GenJob]]] = []
    rows = 0
    for item in jobs:
        n = item[1].num_samples
        if not chunks or rows + n > cap:
            chunks.append([])
            rows = 0
        chunks[-1].append(item)
        rows += n
    return chunks
