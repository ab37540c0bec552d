"""Helpers of the fault tests: the real CLI in a subprocess, directory snapshots, a cheap own export."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TORCH_LOG = re.compile(
    r"^[WI]\d{4} "
)  # torch's own log lines (e.g. "torchvision is not installed") on stderr


def cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`gemma4-compile ARGS` in a fresh interpreter (this checkout first on the path)."""
    return subprocess.run(
        [sys.executable, "-m", "gemma4_compile.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=cli_env(env),
    )


def cli_env(extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return {**env, **(extra or {})}


def snapshot(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `path` (hidden ones included)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in result.stderr.strip().splitlines() if not TORCH_LOG.match(ln)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def fake_export(path: Path) -> Path:
    """A directory this project recognizes as its own export (what `--force` may replace), cheap to make."""
    path.mkdir(parents=True)
    (path / "export.json").write_text(
        json.dumps({"format": "gemma4-compile/export", "version": 1, "old": True})
    )
    (path / "decoder.onnx").write_bytes(b"previous output")
    return path


def copy_export(source: Path, dest: Path) -> Path:
    """A private copy of a session export, to damage."""
    import shutil

    return Path(shutil.copytree(source, dest))


def reseal(export: Path) -> None:
    """Record the current files in export.json as a (buggy) exporter would have written them: fresh hashes and
    seal, so that what a test damaged is no longer caught by the integrity check."""
    import dataclasses

    from gemma4_compile.export.manifest import ExportManifest
    from gemma4_compile.fsutil import sha256_file

    m = ExportManifest.load(export)
    files = {name: sha256_file(export / name) for name in m.files}
    graphs = {r: dataclasses.replace(g, sha256=files[g.file]) for r, g in m.graphs.items()}
    dataclasses.replace(m, files=files, graphs=graphs).save(export)
