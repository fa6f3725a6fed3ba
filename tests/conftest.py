"""Shared fixtures: one redis-server for the session, the tiny model, and stacks of real processes."""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.stackutil import TINY_MODEL, RedisServer, Stack

_dbs = itertools.count(1)


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def models_dir() -> Path:
    from tests.tiny_model import build_tiny_model

    root = Path(os.environ.get("TINKERBELL_TEST_MODELS_DIR") or tempfile.mkdtemp(prefix="tb-models-")) / "models"
    build_tiny_model(root / "tinkerbell" / "tiny-llama")
    return root


def share_converted_model(name: str, models_dir: Path) -> None:
    """Convert a packaged model (SmolLM2's GGUF) once per session, where every stack's resolver finds it first."""
    from backends.models import convert_packaged_model
    from core.settings import Settings

    link = models_dir / name.replace("/", "--")
    if not link.exists():
        converted = convert_packaged_model(
            name, Settings.from_env({"TINKERBELL_DATA_DIR": str(models_dir.parent / "converted")})
        )
        link.symlink_to(converted, target_is_directory=True)


@pytest.fixture(scope="session")
def make_stack(redis_server, models_dir, tmp_path_factory):
    """Factory: a fresh deployment on its own Redis db, with `workers` CPU workers and the API."""
    stacks: list[Stack] = []

    def make(workers: int = 1, extra_env: dict[str, str] | None = None, base_model: str | None = None) -> Stack:
        stack = Stack(
            redis_server, next(_dbs), models_dir, tmp_path_factory.mktemp("data"), extra_env=dict(extra_env or {})
        )
        if base_model:
            stack.base_model = base_model
            if base_model != TINY_MODEL:
                share_converted_model(base_model, models_dir)
        stacks.append(stack)
        for i in range(workers):
            stack.start_worker(f"w{i}")
        stack.start_api()
        return stack

    yield make
    for stack in stacks:
        stack.stop()


@pytest.fixture(scope="session")
def stack(make_stack) -> Stack:
    """The shared single-worker stack most tests use (auth off: any tml- key). It is one owner for the whole session,
    whose adapters add up over every module: no per-key adapter limit (tests/test_quotas.py tests the limits)."""
    return make_stack(1, {"TINKERBELL_AUTH": "off", "TINKERBELL_MAX_ADAPTERS_PER_KEY": "0"})


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "smollm2: uses the real SmolLM2 default model (slower)")
