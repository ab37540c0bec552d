"""Stage 4: publish a finished build directory atomically (`SaveEngine`'s job, as a staging-dir pair).

Everything is written into a hidden staging directory next to the final one, manifest last, then renamed into
place. A crash leaves only a `.<target>.tmp-*` directory, never a half-written engine that looks valid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..fsutil import sha256_file


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A fresh hidden directory beside `final`; removed again unless `publish` moved it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, final: Path) -> None:
    """Replace `final` with `staging` (two renames; the old build is deleted only after the swap)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    staging.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_entry(path: Path, sha256: str | None = None) -> dict:
    return {"sha256": sha256 or sha256_file(path), "bytes": path.stat().st_size}
