"""The export's tokenizer and chat template, read with `tokenizers` and jinja2 (never transformers).

Rendering follows transformers' `apply_chat_template` (a sandboxed jinja2 environment with trim_blocks and
lstrip_blocks, the special tokens as variables, `raise_exception`), so prompts and ids are the ones a
transformers user gets from the same files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from .errors import RuntimeInputError


@dataclass(frozen=True)
class GenerationDefaults:
    """generation_config.json: the ids that end a turn and the sampling defaults the checkpoint ships."""

    eos_token_ids: tuple[int, ...]
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    do_sample: bool = False


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RuntimeInputError(f"{path} is not valid JSON ({e})") from None


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    return value.get("content") if isinstance(value, dict) else value


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


class TextTokenizer:
    """Encode, decode and render chats with the files an export carries next to its graphs."""

    def __init__(self, export_dir: str | Path):
        root = Path(export_dir)
        if not (root / "tokenizer.json").is_file():
            raise RuntimeInputError(
                f"{root} has no tokenizer (tokenizer.json); export a checkpoint that ships one"
            )
        self.tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        self.config = _read_json(root / "tokenizer_config.json")
        template = root / "chat_template.jinja"
        self.chat_template: str | None = (
            template.read_text() if template.is_file() else self.config.get("chat_template")
        )
        self.special = {
            k: _token_text(self.config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        self.defaults = self._generation_defaults(_read_json(root / "generation_config.json"))

    def _generation_defaults(self, gen: dict[str, Any]) -> GenerationDefaults:
        eos = gen.get("eos_token_id")
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        if not ids and self.special["eos_token"] is not None:
            ids = [self.tokenizer.token_to_id(self.special["eos_token"])]
        return GenerationDefaults(
            eos_token_ids=tuple(int(i) for i in ids if i is not None),
            temperature=gen.get("temperature"),
            top_k=gen.get("top_k"),
            top_p=gen.get("top_p"),
            do_sample=bool(gen.get("do_sample", False)),
        )

    # ----- text <-> ids -----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream(self) -> TextStream:
        return TextStream(self.tokenizer)

    # ----- chats ------------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise RuntimeInputError(
                "the export has no chat template (chat_template.jinja or tokenizer_config.json)"
            )
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals.update(
            raise_exception=_raise_exception, strftime_now=lambda f: datetime.now().strftime(f)
        )
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special
            )
        except TemplateError as e:
            raise RuntimeInputError(f"chat template: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Prompt ids of a chat; the template writes `<bos>` itself, so no special tokens are added."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)


class TextStream:
    """Text of a growing id sequence, piece by piece: `push` gives what became complete UTF-8, `flush` the
    rest at the end, so the pieces join to exactly `decode(ids)`."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""
        self._stream = DecodeStream(skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        piece = self._stream.step(self.tokenizer, token) or ""
        self.text += piece
        return piece

    def flush(self) -> str:
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        rest = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += rest
        return rest


def load_tokenizer(export_dir: str | Path) -> TextTokenizer:
    return TextTokenizer(export_dir)
