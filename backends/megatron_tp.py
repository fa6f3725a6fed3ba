"""Tensor-parallel plumbing for the megatron backend: one process per rank, rank 0 being the worker itself.

Rank 0 starts the followers, they join one torch.distributed group (gloo on the CPU, NCCL on GPUs); each backend
call is sent to every follower over a local socket, all ranks run it, rank 0 answers.
"""

from __future__ import annotations

import datetime
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.settings import Settings

log = logging.getLogger(__name__)
# Followers wait for commands on a queue, never in a collective, so an idle worker hits no collective timeout.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
START_TIMEOUT_S = 300.0  # followers import torch + megatron-core before they connect
_REPO = str(Path(__file__).resolve().parent.parent)


def rank_devices(settings: Settings) -> list[torch.device]:
    """settings.device ("cpu", "cuda:0" or "cuda:0,cuda:1") -> one device per tensor-parallel rank."""
    tp = int(settings.tensor_parallel or 1)
    if tp < 1:
        raise ValueError(f"TINKERBELL_TENSOR_PARALLEL must be >= 1, not {tp}")
    names = [d.strip() for d in (settings.device or "cpu").split(",") if d.strip()] or ["cpu"]
    if names == ["cpu"]:
        return [torch.device("cpu")] * tp
    if len(names) != tp:
        raise ValueError(
            f"TINKERBELL_DEVICE lists {len(names)} device(s) ({settings.device!r}) but TINKERBELL_TENSOR_PARALLEL is "
            f"{tp}"
        )
    devices = [torch.device(n) for n in names]
    if any(d.type == "cuda" for d in devices):
        if not torch.cuda.is_available():
            raise ValueError(f"TINKERBELL_DEVICE {settings.device!r}: CUDA is not available in this process")
        count = torch.cuda.device_count()
        for d in devices:
            if d.type == "cuda" and (d.index or 0) >= count:
                raise ValueError(
                    f"device {d} is not visible here "
                    f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, {count} GPU(s))"
                )
    return devices


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_rank(rank: int, world: int, device: torch.device, init_method: str) -> None:
    """Join the process group, set up megatron-core's tensor-parallel state (tp = world), shim the CPU if needed."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise RuntimeError(
                f"this process already belongs to a torch.distributed group of {dist.get_world_size()} "
                f"(rank {dist.get_rank()}); a megatron backend with tensor_parallel {world} needs its own process"
            )
    else:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend, init_method=init_method, world_size=world, rank=rank, timeout=COLLECTIVE_TIMEOUT, **kwargs
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=world, create_gloo_process_groups=device.type == "cpu"
        )
    elif parallel_state.get_tensor_model_parallel_world_size() != world:
        raise RuntimeError(
            "megatron-core is already set up here with tensor_parallel "
            f"{parallel_state.get_tensor_model_parallel_world_size()}"
        )
    if device.type == "cpu":
        from backends.megatron_cpu import apply_cpu_shims

        apply_cpu_shims()
    else:
        model_parallel_cuda_manual_seed(1234)  # dropout is 0: the seed only has to exist


@dataclass
class _Follower:
    rank: int
    process: subprocess.Popen[bytes]
    conn: Any = None  # multiprocessing.connection.Connection, once it has connected


class FollowerGroup:
    """Rank 0's handle on ranks 1..tp-1: start them, send each call, collect their answers.

    Followers are fresh interpreters (`python -m backends.megatron_tp`) talking over an authenticated local socket:
    multiprocessing's spawn would re-import the worker's __main__ in every rank (it does, under pytest or a script).
    """

    def __init__(self, settings: Settings, devices: list[torch.device], dtype: torch.dtype) -> None:
        from multiprocessing.connection import Listener

        self.world = len(devices)
        self.init_method = f"tcp://127.0.0.1:{free_port()}"
        self.broken: str | None = None
        authkey = secrets.token_bytes(32)
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        env = dict(os.environ, TINKERBELL_TP_AUTHKEY=authkey.hex())
        env["PYTHONPATH"] = os.pathsep.join([_REPO, *filter(None, [env.get("PYTHONPATH")])])
        self.followers = []
        try:
            for rank in range(1, self.world):
                address = f"{listener.address[0]}:{listener.address[1]}"
                command = [sys.executable, "-m", "backends.megatron_tp", address, str(rank)]
                self.followers.append(_Follower(rank, subprocess.Popen(command, env=env, cwd=_REPO)))
            done = threading.Event()
            threading.Thread(target=self._watch_start, args=(listener.address, authkey, done), daemon=True).start()
            pending = {f.rank: f for f in self.followers}
            while pending:
                conn = listener.accept()
                rank = int(conn.recv())
                if rank < 0:
                    raise RuntimeError(
                        "a megatron tensor-parallel follower exited before it connected (see its stderr)"
                    )
                pending.pop(rank).conn = conn
                conn.send((settings, rank, self.world, str(devices[rank]), self.init_method, dtype))
            done.set()
        except Exception:
            self.close()
            raise
        finally:
            listener.close()

    def _watch_start(self, address: Any, authkey: bytes, done: threading.Event) -> None:
        # accept() has no timeout: if a follower dies before connecting, connect in its place to say so.
        from multiprocessing.connection import Client

        deadline = time.monotonic() + START_TIMEOUT_S
        while not done.wait(0.5):
            if (
                any(f.conn is None and f.process.poll() is not None for f in self.followers)
                or time.monotonic() > deadline
            ):
                with Client(address, authkey=authkey) as conn:
                    conn.send(-1)
                return

    def send(self, method: str, args: tuple[Any, ...]) -> None:
        if self.broken:
            raise RuntimeError(f"megatron tensor-parallel group is broken ({self.broken}); restart the worker")
        for follower in self.followers:
            follower.conn.send((method, args))

    def collect(self) -> dict[int, tuple[bool, Any]]:
        """Each follower's answer to the last call: rank -> (ok, result or traceback). A dead follower breaks the
        group."""
        answers: dict[int, tuple[bool, Any]] = {}
        for follower in self.followers:
            while not follower.conn.poll(1.0):
                if follower.process.poll() is not None:
                    self.broken = f"rank {follower.rank} exited ({follower.process.returncode})"
                    raise RuntimeError(f"megatron tensor-parallel {self.broken}; restart the worker")
            try:
                ok, value = follower.conn.recv()
            except (EOFError, OSError) as exc:
                self.broken = f"rank {follower.rank} hung up"
                raise RuntimeError(f"megatron tensor-parallel {self.broken}; restart the worker") from exc
            answers[follower.rank] = (ok, value)
        return answers

    def close(self) -> None:
        for follower in self.followers:
            try:
                if follower.conn is not None:
                    follower.conn.send(None)
                    follower.conn.close()
            except (OSError, ValueError):
                pass
        for follower in self.followers:
            try:
                follower.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                follower.process.kill()
        self.followers = []


def follower_main(address: str, rank: int) -> None:
    """A follower rank: build the same per-rank state as rank 0, then run each call rank 0 sends until told to stop."""
    from multiprocessing.connection import Client

    host, port = address.rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ.pop("TINKERBELL_TP_AUTHKEY")))
    conn.send(rank)
    settings, rank, world, device, init_method, dtype = conn.recv()
    logging.basicConfig(level=settings.log_level)
    from backends.megatron_rank import MegatronRank

    try:
        init_rank(rank, world, torch.device(device), init_method)
        state = MegatronRank(settings, rank, world, torch.device(device), dtype)
    except Exception:  # noqa: BLE001 - reported to rank 0, which fails the backend's start
        conn.send((False, traceback.format_exc()))
        return
    conn.send((True, "ready"))
    while True:
        try:
            message = conn.recv()  # blocks without a timeout: an idle worker is fine
        except (EOFError, OSError):  # rank 0 is gone
            break
        if message is None:
            break
        method, args = message
        try:
            conn.send((True, getattr(state, method)(*args)))
        except Exception:  # noqa: BLE001 - rank 0 decides whether the group is still in step
            conn.send((False, traceback.format_exc()))
    try:
        import torch.distributed as dist

        dist.destroy_process_group()
    except Exception:
        log.debug("destroy_process_group failed", exc_info=True)


if __name__ == "__main__":
    follower_main(sys.argv[1], int(sys.argv[2]))
