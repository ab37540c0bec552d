"""What running an export needs besides its graphs, copied from the checkpoint: tokenizer, chat template and
generation config. The export's `files` table in export.json records their sha256 like every other file, so
an export directory runs without its source checkpoint (and without transformers)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..fsutil import sha256_file

RUNTIME_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "special_tokens_map.json",
)


def copy_runtime_files(checkpoint: Path | None, dest: Path) -> dict[str, str]:
    """Copy whichever runtime files the checkpoint has into `dest`; -> name -> sha256 of each one copied.
    A checkpoint without them still exports (the runtime then says the export has no tokenizer)."""
    if checkpoint is None:
        return {}
    copied = {}
    for name in RUNTIME_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, dest / name)
            copied[name] = sha256_file(dest / name)
    return copied
