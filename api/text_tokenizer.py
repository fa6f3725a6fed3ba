"""A base model's tokenizer and chat template in the API process, without transformers (which imports torch).

The Rust `tokenizers` library reads tokenizer.json; the chat template is rendered with jinja2 the way
transformers renders it (sandboxed, trim_blocks, lstrip_blocks, loopcontrols, raise_exception, strftime_now).
tests/test_openai.py checks the token ids against transformers' own apply_chat_template.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import threading
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from backends.models import packaged_gguf, tokenizer_cache_dir, tokenizer_dir
from core.errors import UserError
from core.settings import Settings

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_cache: dict[tuple[str, str], TextTokenizer] = {}
_lock = threading.Lock()


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": …} (AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class TextTokenizer:
    """Text <-> token ids and the chat template of one base model, read from its tokenizer directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        if not (directory / "tokenizer.json").is_file():
            raise UserError(f"model: {directory.name} has no tokenizer.json (the OpenAI face needs a fast tokenizer)")
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config_path = directory / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
        specials_path = directory / "special_tokens_map.json"
        specials = json.loads(specials_path.read_text()) if specials_path.is_file() else {}
        self.special_tokens = {
            name: _token_text(self.config.get(name, specials.get(name)))
            for name in SPECIAL_NAMES
            if _token_text(self.config.get(name, specials.get(name))) is not None
        }

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @cached_property
    def chat_template(self) -> str | None:
        """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or named ones: "default")."""
        path = self.directory / "chat_template.jinja"
        if path.is_file():
            return path.read_text()
        template = self.config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    @cached_property
    def _compiled(self) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        return env.from_string(self.chat_template or "")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def strip_special(self, text: str) -> str:
        """`text` without the special tokens' strings (decode(skip_special_tokens=True) for decoded text)."""
        for token in self.tokenizer.get_added_tokens_decoder().values():
            if token.special and token.content:
                text = text.replace(token.content, "")
        return text

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """The prompt token ids, as transformers' apply_chat_template(tokenize=True) gives them."""
        if self.chat_template is None:
            raise UserError("model: this base model has no chat template; use /v1/completions with a plain prompt")
        try:
            text = self._compiled.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except jinja2.exceptions.TemplateError as exc:
            raise UserError(f"messages: the model's chat template refused them ({exc})") from None
        return self.encode(text, add_special_tokens=False)  # the template writes its own special tokens


def _locate(base_model: str, settings: Settings) -> Path:
    """backends.models.tokenizer_dir, in a child process when it would extract a packaged GGUF's tokenizer: that
    extraction uses transformers, and so torch, which the API process never imports (DESIGN rule 1)."""
    cached = tokenizer_cache_dir(base_model, settings)
    if packaged_gguf(base_model) is None or (cached / "tokenizer_config.json").is_file():
        return tokenizer_dir(base_model, settings)
    code = (
        "import sys; from backends.models import tokenizer_dir; from core.settings import Settings; "
        "print(tokenizer_dir(sys.argv[1], Settings.from_env()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, base_model], check=True, capture_output=True, text=True, timeout=300
    )
    return Path(done.stdout.strip().splitlines()[-1])


def text_tokenizer(base_model: str, settings: Settings) -> TextTokenizer:
    """The tokenizer of `base_model`, loaded once per API process."""
    key = (base_model, str(settings.data_path))
    with _lock:
        if key not in _cache:
            _cache[key] = TextTokenizer(_locate(base_model, settings))
        return _cache[key]
