"""One generation loop over many sample requests on a shared base model (backends/hf_sample.py validates and batches).

Prompts are left-padded with an attention mask and per-row position ids, each row has its own adapter, sampling
parameters and generator, and rows leave the KV cache as they finish, so every row's numbers are its solo run's.
"""

from __future__ import annotations

import inspect
import secrets
import time
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from backends.base import SampledSequence, SampleResult, SamplingSpec
from backends.hf import LoadedBase
from core.errors import UserError


@dataclass
class GenJob:
    """One validated sample request. adapter: its name on the base model (None: the base model itself).
    spec: as backends.sample_checks.validate returns it (max_tokens an int, stop None or a list)."""

    prompt: list[int]
    spec: SamplingSpec
    num_samples: int
    adapter: str | None
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    time_limit_s: float | None = None  # from the start of its loop; past it the job fails, the others go on
    topk_sample_logprobs: int = 0
    target_prompt_cells: np.ndarray | None = None  # (n, 2) int64 [row, token id or -1], as validate_extras returns
    prompt_alt_tokens_k: int = 0

    def needs_prompt_logits(self) -> bool:
        """Whether the prefill must keep every prompt position's logits, not only the last one's."""
        return bool(
            self.prompt_logprobs
            or self.topk_prompt_logprobs
            or self.target_prompt_cells is not None
            or self.prompt_alt_tokens_k
        )


@dataclass
class _Row:
    """One sequence being decoded for job `job` (jobs[job]); a job's rows stay in sample order."""

    job: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk: list[list[tuple[int, float]]] = field(default_factory=list)  # per token, when its job asks for top-k
    reason: str = "length"


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


def _draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: (n, V) probabilities and (n,) or (n, k) uniforms in [0, 1) -> (n,) or (n, k) token ids.

    Uniforms drawn on the CPU from the request's own generator keep a request's tokens independent of whatever else
    shares the batch and of the device; right=True never lands on a zero-probability token."""
    cdf = probs.cumsum(-1)  # (n, V), non-decreasing
    per_row = uniforms.ndim == 1
    target = (uniforms[:, None] if per_row else uniforms) * cdf[:, -1:]  # (n, 1) or (n, k)
    ids = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)
    return ids.squeeze(1) if per_row else ids


def _derived_seed(seed: int, stream: int) -> int:
    """A seed for another random stream of the same request (prompt_alt_tokens_k), so asking for it does not change
    the sampled tokens, and request seeds s and s + 1 do not share a stream."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0]) >> 1


class StopChecker:
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


class _Forward:
    """base.model(...) with attention mask and position ids (decode_step has neither), routed per row."""

    def __init__(self, base: LoadedBase) -> None:
        self.base = base
        accepted = inspect.signature(base.model.forward).parameters
        self.cache_kw = "cache" if "cache" in accepted else "past_key_values"  # transformers 5.2x renamed it
        self.has_logits_to_keep = "logits_to_keep" in accepted

    def __call__(
        self,
        adapters: list[str | None],
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        last_only: bool,
    ) -> tuple[torch.Tensor, Any]:
        """(R, T) ids, (R, past + T) mask, (R, T) positions -> ((R, T', V) logits, cache); T' = 1 with last_only."""
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": True,
        }
        if cache is not None:
            kwargs[self.cache_kw] = cache
        if last_only and self.has_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        with self.base.routed(adapters), self.base.autocast():
            out = self.base.model(**kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return (out.logits[:, -1:] if last_only else out.logits), new_cache


def _prompt_results(logits: torch.Tensor, jobs: list[GenJob], width: int) -> list[SampleResult]:
    """(J, P, V) prefill logits of left-padded prompts -> each job's prompt logprobs, top-k prompt logprobs, target
    prompt logprobs and prompt alternative-token draws."""
    results = []
    for j, job in enumerate(jobs):
        result = SampleResult(sequences=[])
        results.append(result)
        if not job.needs_prompt_logits():
            continue
        rows = logits[j, width - len(job.prompt) : -1].float()  # (L-1, V): row i predicts prompt[i+1]
        lsm = rows.log_softmax(-1)  # (L-1, V)
        if job.prompt_logprobs:
            ids = torch.tensor(job.prompt[1:], dtype=torch.int64, device=logits.device)  # (L-1,)
            picked = lsm.gather(-1, ids[:, None]).squeeze(-1)  # (L-1,)
            result.prompt_logprobs = [None] + [float(v) for v in picked.tolist()]
        if job.topk_prompt_logprobs:
            values, indices = lsm.topk(job.topk_prompt_logprobs, dim=-1)  # (L-1, k)
            result.topk_prompt_logprobs = [[]] + [  # position 0 has no prediction: an empty row
                list(zip(map(int, i_row), map(float, v_row))) for i_row, v_row in zip(indices.tolist(), values.tolist())
            ]
        if job.target_prompt_cells is not None:
            cells = torch.as_tensor(job.target_prompt_cells, dtype=torch.int64, device=logits.device)  # (n, 2)
            wanted = cells[:, 1]  # (n,), -1 where the cell asks for nothing
            picked = lsm[cells[:, 0], wanted.clamp(min=0)].masked_fill(wanted < 0, 0.0)  # (n,)
            result.target_prompt_logprobs = picked.cpu().numpy().astype(np.float32)
        if job.prompt_alt_tokens_k:
            draws = _alt_draws(rows, job)  # (L-1, k)
            result.prompt_alt_tokens = draws.cpu().numpy().astype(np.int64)
            result.prompt_alt_logprobs = lsm.gather(-1, draws).cpu().numpy().astype(np.float32)
    return results


def _alt_draws(rows: torch.Tensor, job: GenJob) -> torch.Tensor:
    """(L-1, V) prompt logits -> (L-1, k) token ids drawn with replacement from each position's next-token
    distribution at the job's temperature (no top-k / top-p); temperature 0 repeats the argmax."""
    k, temperature = job.prompt_alt_tokens_k, job.spec.temperature
    if temperature == 0:
        return rows.argmax(-1, keepdim=True).expand(-1, k)
    seed = job.spec.seed if job.spec.seed is not None else secrets.randbits(63)
    generator = torch.Generator().manual_seed(_derived_seed(seed, 1))
    uniforms = torch.rand((rows.shape[0], k), generator=generator).to(rows.device)  # (L-1, k), CPU-drawn
    return _draw(_filtered_probs(rows, temperature, -1, 1.0), uniforms)


def _choose(
    logits: torch.Tensor, row_jobs: list[int], jobs: list[GenJob], generators: dict[int, torch.Generator]
) -> tuple[torch.Tensor, list[int], list[float], list[list[tuple[int, float]] | None]]:
    """(R, V) next-token logits -> chosen ids (R,), their raw (temperature 1) logprobs, and each row's raw top-k
    (token, logprob) where its job asks for topk_sample_logprobs (else None), by each row's job."""
    rows = len(row_jobs)
    groups: dict[tuple[float, int, float], list[int]] = {}  # rows that share sampling parameters
    by_job: dict[int, list[int]] = {}
    for b, j in enumerate(row_jobs):
        spec = jobs[j].spec
        key = (0.0, -1, 1.0) if spec.temperature == 0 else (spec.temperature, spec.top_k, spec.top_p)
        groups.setdefault(key, []).append(b)
        by_job.setdefault(j, []).append(b)
    uniforms = torch.zeros(rows)  # (R,), CPU: each job draws for its own rows, in sample order
    for j, members in by_job.items():
        if j in generators:
            uniforms[members] = torch.rand(len(members), generator=generators[j])
    uniforms = uniforms.to(logits.device)
    chosen = torch.empty(rows, dtype=torch.int64, device=logits.device)  # (R,)
    for (temperature, top_k, top_p), members in groups.items():
        index = slice(None) if len(members) == rows else torch.tensor(members, device=logits.device)
        if temperature == 0:
            chosen[index] = logits[index].argmax(-1)
        else:
            chosen[index] = _draw(_filtered_probs(logits[index], temperature, top_k, top_p), uniforms[index])
    norm = logits.logsumexp(-1)  # (R,)
    picked = logits.gather(-1, chosen[:, None]).squeeze(1)  # (R,)
    chosen_lp = picked - norm  # (R,) log-softmax at temperature 1
    tops: list[list[tuple[int, float]] | None] = [None] * rows
    wants = [b for b, j in enumerate(row_jobs) if jobs[j].topk_sample_logprobs]
    if wants:
        index = torch.tensor(wants, device=logits.device)
        k = max(jobs[row_jobs[b]].topk_sample_logprobs for b in wants)
        values, ids = (logits[index] - norm[index, None]).topk(k, dim=-1)  # (R', k) raw log-softmax
        for b, id_row, value_row in zip(wants, ids.tolist(), values.tolist()):
            mine = jobs[row_jobs[b]].topk_sample_logprobs
            tops[b] = list(zip(id_row[:mine], value_row[:mine]))
    return chosen, chosen.tolist(), chosen_lp.tolist(), tops


def drain(steps: Generator[None, None, Any]) -> Any:
    """Run a stepping generator to its end and return its value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


@contextmanager
def _step(base: LoadedBase) -> Generator[None, None, None]:
    """One step's hold on the base model: its lock and no autograd, released before the generator yields."""
    with base.lock, torch.no_grad():
        yield


def generate_steps(base: LoadedBase, jobs: list[GenJob]) -> Generator[None, None, list[SampleResult | Exception]]:
    """Decode every job's num_samples continuations in one loop, yielding after the prefill and after each decode
    step so the engine can run other work in between (each step takes base.lock and no_grad itself; the KV cache
    and rows live here between steps). Returns one result per job: a job still decoding past its time_limit_s gets
    a UserError in its slot; its rows leave the batch."""
    with _step(base):
        device, forward = base.device, _Forward(base)
        started = time.monotonic()
        deadlines = [started + job.time_limit_s if job.time_limit_s else None for job in jobs]
        timed_out: set[int] = set()
        lengths = [len(job.prompt) for job in jobs]
        width = max(lengths)
        pad = base.eos_ids[0] if base.eos_ids else 0  # any in-vocabulary id: padded keys are masked out
        ids = torch.full((len(jobs), width), pad, dtype=torch.int64)  # (J, P), left-padded
        mask = torch.zeros((len(jobs), width), dtype=torch.int64)  # (J, P), 1 on real tokens
        for j, job in enumerate(jobs):
            ids[j, width - lengths[j] :] = torch.tensor(job.prompt, dtype=torch.int64)
            mask[j, width - lengths[j] :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (J, P): each row counts from its first real token
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        want_all = any(job.needs_prompt_logits() for job in jobs)
        adapters = [job.adapter for job in jobs]
        logits, cache = forward(adapters, ids, mask, positions, None, last_only=not want_all)  # (J, P or 1, V)
        results = _prompt_results(logits, jobs, width) if want_all else [SampleResult(sequences=[]) for _ in jobs]
        next_logits = logits[:, -1].float()  # (J, V)
        del logits

        rows = [_Row(job=j) for j, job in enumerate(jobs) for _ in range(job.num_samples)]
        active = [r for r, row in enumerate(rows) if jobs[row.job].spec.max_tokens > 0]  # batch position -> row
        if active:
            # The n samples of a job share its prompt's KV cache; jobs with max_tokens 0 leave before the first step.
            select = torch.tensor([rows[r].job for r in active], device=device)  # (R,)
            if len(active) != len(jobs) or any(rows[r].job != b for b, r in enumerate(active)):
                cache.batch_select_indices(select)
                mask, next_logits = mask[select], next_logits[select]  # (R, P), (R, V)
            lengths_now = torch.tensor(
                [lengths[rows[r].job] for r in active], device=device
            )  # (R,) next position per row
        stops = [StopChecker(job.spec.stop, base) for job in jobs]
        generators: dict[int, torch.Generator] = {}
        for j, job in enumerate(jobs):
            if job.spec.temperature != 0:
                seed = job.spec.seed if job.spec.seed is not None else secrets.randbits(63)
                generators[j] = torch.Generator().manual_seed(seed)
    yield
    while active:
        with _step(base):
            row_jobs = [rows[r].job for r in active]
            chosen, tokens, chosen_lp, tops = _choose(next_logits, row_jobs, jobs, generators)  # (R,)
            now = time.monotonic()
            stay = []
            for b, r in enumerate(active):
                row = rows[r]
                row.tokens.append(tokens[b])
                row.logprobs.append(chosen_lp[b])
                if tops[b] is not None:
                    row.topk.append(tops[b])  # type: ignore[arg-type]
                if stops[row.job](row.tokens):
                    row.reason = "stop"
                elif len(row.tokens) < jobs[row.job].spec.max_tokens:
                    deadline = deadlines[row.job]
                    if deadline is not None and now > deadline:
                        timed_out.add(row.job)  # not finished in time: the job fails, its rows leave
                    else:
                        stay.append(b)
            if not stay:
                break
            if len(stay) < len(active):  # finished rows leave the batch and the KV cache
                keep = torch.tensor(stay, device=device)
                cache.batch_select_indices(keep)
                mask, chosen, lengths_now = mask[keep], chosen[keep], lengths_now[keep]  # (R', past), (R',), (R',)
                active = [active[b] for b in stay]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)  # (R, past + 1)
            adapters = [jobs[rows[r].job].adapter for r in active]
            step_logits, cache = forward(
                adapters, chosen[:, None], mask, lengths_now[:, None], cache, True
            )  # (R, 1, V)
            next_logits = step_logits[:, -1].float()  # (R, V)
            lengths_now = lengths_now + 1
        yield
    for row in rows:
        topk = row.topk if jobs[row.job].topk_sample_logprobs else None
        sequence = SampledSequence(tokens=row.tokens, logprobs=row.logprobs, stop_reason=row.reason, topk_logprobs=topk)
        results[row.job].sequences.append(sequence)
    out: list[SampleResult | Exception] = list(results)
    for j in timed_out:
        out[j] = UserError(
            f"sample: still decoding after {jobs[j].time_limit_s:g} s, the worker's limit "
            f"(TINKERBELL_SAMPLE_TIME_LIMIT_S); ask for fewer num_samples or max_tokens, or split the request"
        )
    return out
