"""Atomic output directories: build in a temporary sibling, rename into place only when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import Gemma4CompileError


@contextmanager
def atomic_directory(out: Path, error: type[Gemma4CompileError] = Gemma4CompileError) -> Iterator[Path]:
    """Yield an empty temporary directory beside `out`; on success it replaces `out`, on any failure it
    is removed, so a failed run never leaves a half-written artifact that looks valid."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp.", dir=out.parent))
    except OSError as e:
        raise error(f"cannot create {out}: {e.strerror or e}") from None
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise error(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
