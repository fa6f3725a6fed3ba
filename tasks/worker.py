"""Start one Celery worker pinned to one device: `python -m tasks.worker --device cuda:0 --name gpu0`.

Pins the device with CUDA_VISIBLE_DEVICES before torch loads, runs a Celery worker on the threads pool that consumes
worker.<name> (pool threads hold many messages at once; the engine thread in tasks/engine.py runs them on the
device), registers itself in Redis with a heartbeat, and re-subscribes the adapters it owns.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import socket
import sys
import threading
import time
from typing import Any

log = logging.getLogger("tinkerbell.worker")


def default_name(device: str) -> str:
    if device == "cpu":
        return "cpu0"
    return "gpu" + "-".join(part.split(":")[-1] for part in device.split(","))  # cuda:0,cuda:1 -> gpu0-1


def pin_device(device: str) -> str:
    """cuda:N -> CUDA_VISIBLE_DEVICES=N, and the process then sees it as cuda:0; a tensor-parallel worker's
    cuda:2,cuda:3 -> CUDA_VISIBLE_DEVICES=2,3, seen as cuda:0,cuda:1 (one rank each)."""
    parts = [p.strip() for p in device.split(",") if p.strip()]
    if parts and all(p.startswith("cuda") for p in parts):
        indices = [p.split(":")[1] if ":" in p else "0" for p in parts]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(indices)
        return ",".join(f"cuda:{i}" for i in range(len(indices)))
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return "cpu"
    raise SystemExit(f"--device must be cpu, cuda:N or a list cuda:N,cuda:M (tensor parallel), not {device!r}")


def _heartbeat_loop(stop: threading.Event) -> None:
    from tasks.runtime import runtime

    period = runtime.settings.heartbeat_s
    while not stop.is_set():
        try:
            info = {
                **runtime.status(),
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "physical_device": runtime.settings.physical_device or runtime.settings.device,
            }
            runtime.registry.register_worker(runtime.name, info, ttl_s=3 * period)
            _delete_expired_checkpoints()
        except Exception:  # Redis briefly away: keep beating
            log.exception("heartbeat failed")
        stop.wait(period)


def _sweep_loop(stop: threading.Event) -> None:
    """Every TINKERBELL_SWEEP_S: park idle sessions' adapters, take adapters from dead workers (tasks/placement.py)."""
    from tasks.placement import sweep
    from tasks.runtime import runtime

    while not stop.wait(runtime.settings.sweep_s):
        try:
            sweep()
        except Exception:  # Redis briefly away: sweep again next time
            log.exception("sweep failed")


def _delete_expired_checkpoints() -> None:
    """Checkpoints past their ttl_seconds: files first, then the record (every worker sweeps; each is claimed once)."""
    from tasks.runtime import runtime

    for model_id, record in runtime.registry.claim_expired_checkpoints(time.time()):
        shutil.rmtree(record["dir"], ignore_errors=True)
        runtime.registry.delete_checkpoint(model_id, record["checkpoint_id"])
        log.info("deleted expired checkpoint %s of %s", record["checkpoint_id"], model_id)


def _on_ready(sender: Any, **_: Any) -> None:
    """worker_ready: remember the consumer, start the heartbeat, load base models, re-subscribe owned adapters."""
    from tasks.engine import CALL, Work
    from tasks.runtime import runtime
    from tasks.training import restore_adapter

    runtime.consumer = sender
    owned = runtime.registry.worker_adapters(runtime.name)
    _restore_requests_in_flight(runtime, owned)
    from losses import list_losses

    runtime.registry.publish_builtin_losses([entry for entry in list_losses() if entry.get("builtin")])
    stop = threading.Event()
    threading.Thread(target=_heartbeat_loop, args=(stop,), name="heartbeat", daemon=True).start()
    threading.Thread(target=_sweep_loop, args=(stop,), name="sweep", daemon=True).start()
    settings = runtime.settings
    from backends.models import is_known_model

    for base_model in settings.worker_base_models:  # served, loaded on first use: say now if one cannot be found
        if not is_known_model(base_model, settings):
            log.error(
                "TINKERBELL_BASE_MODELS lists %s, which this worker cannot find; requests for it fail", base_model
            )
    vllm_sampler = "sample" in settings.roles and settings.sampling_backend_name == "vllm"
    for base_model in settings.worker_base_models:
        # A vLLM sampler starts its engines now, not on the first request; it needs no HF copy unless it trains.
        preloads = (
            []
            if vllm_sampler and "train" not in settings.roles
            else [getattr(runtime.training, "load_base_model", None)]
        )
        if vllm_sampler:
            preloads.append(lambda name: runtime.sampling.load_base_model(name))
        try:
            for preload in filter(None, preloads):
                runtime.engine.run(Work(CALL, functools.partial(preload, base_model)))
        except Exception:
            log.exception("could not preload base model %s", base_model)
            continue
        runtime.serve_base_model(base_model)
    for model_id in owned:
        record = runtime.registry.model_any(model_id)
        if record and not record.get("deleted") and record.get("worker") == runtime.name:
            try:
                restore_adapter(model_id, record)
            except Exception:
                log.exception("could not restore adapter %s", model_id)
    log.info("worker %s ready on %s", runtime.name, runtime.settings.device)


def _restore_requests_in_flight(runtime: Any, owned: list[str]) -> None:
    """Requests this worker had taken but not finished when it last stopped (killed, machine lost) go back to the
    front of their queues now, not after the broker's visibility timeout: nothing is consumed yet at worker_ready."""
    from tasks.broker import restore_own_unacked
    from tasks.celery_app import adapter_queue, worker_queue

    queues = {worker_queue(runtime.name)} | {adapter_queue(model_id) for model_id in owned}
    try:
        with runtime.celery.connection_for_write() as connection:
            restored = restore_own_unacked(connection, queues)
    except Exception:  # the broker's own restore still brings them back after the visibility timeout
        log.exception("could not restore the requests in flight when this worker last stopped")
        return
    if restored:
        log.warning(
            "restored %d request(s) in flight when this worker last stopped: %s", len(restored), ", ".join(restored)
        )


def _on_shutdown(**_: Any) -> None:
    from tasks.runtime import runtime

    runtime.engine.stop()
    runtime.registry.unregister_worker(runtime.name)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def tune_malloc() -> bool:
    """Keep freed memory in the process instead of handing it back to the kernel after every step.

    glibc's default returns the top of the heap to the OS whenever a large block is freed, so each training
    step page-faults its activations in again (measured: the same forward_backward 15-20 % slower in a worker
    than in a fresh process). A large trim threshold and a fixed 32 MiB mmap threshold (the most glibc allows)
    keep that memory mapped. No effect on other C libraries.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(mallopt(M_MMAP_THRESHOLD, 32 << 20))


def main(argv: list[str] | None = None) -> None:
    from dataclasses import replace

    from core.settings import Settings

    env = Settings.from_env()  # the worker's one read of the environment; the command line overrides it
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default=env.device, help="cpu or cuda:N")
    parser.add_argument("--name", default=env.worker_name, help="readable worker name (queue worker.<name>)")
    parser.add_argument(
        "--role", default=env.role, help="train, sample or train,sample (default: both, so one worker runs everything)"
    )
    parser.add_argument(
        "--tensor-parallel",
        type=int,
        default=env.tensor_parallel,
        help="Megatron backend: ranks in this worker's tensor-parallel group, one per device in --device",
    )
    parser.add_argument("--loglevel", default=env.log_level)
    args, extra = parser.parse_known_args(argv)
    name = args.name or default_name(args.device)
    settings = replace(
        env,
        device=pin_device(args.device),  # before anything imports torch
        physical_device=env.physical_device or args.device,
        worker_name=name,
        role=args.role,
        tensor_parallel=args.tensor_parallel,
        log_level=args.loglevel,
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tune_malloc()
    logging.basicConfig(
        level=args.loglevel.upper(),
        format=f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s",
        stream=sys.stdout,
    )

    from celery import signals

    from tasks.celery_app import app, config, worker_queue
    from tasks.runtime import runtime

    app.conf.update(config(settings))  # the module-level app the task modules register with, on these settings
    runtime.configure(settings, app)
    signals.worker_ready.connect(_on_ready, weak=False)
    signals.worker_shutdown.connect(_on_shutdown, weak=False)
    if "sample" in settings.roles and settings.sampling_backend_name == "vllm":
        from backends.loader import BackendUnavailable
        from backends.vllm import require_vllm

        try:
            require_vllm()  # at start-up, not at the first sample request
        except BackendUnavailable as exc:
            raise SystemExit(f"worker {name}: {exc}") from exc
    if "train" in settings.roles and settings.training_backend_name == "megatron":
        import importlib.util

        from backends.loader import TRAINING_BACKENDS

        if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
            raise SystemExit(
                f"worker {name}: training backend 'megatron' (USE_MEGATRON / TINKERBELL_TRAINING_BACKEND) needs "
                f"megatron-core, which is not installed here: {TRAINING_BACKENDS['megatron'][2]}"
            )
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={settings.worker_concurrency}",
            f"--prefetch-multiplier={settings.worker_prefetch}",
            "-n",
            f"{name}@{socket.gethostname()}",
            "-Q",
            worker_queue(name),
            "--loglevel",
            args.loglevel,
            "-E",
            "--without-gossip",
            "--without-mingle",
            *extra,
        ]
    )


if __name__ == "__main__":
    main()
