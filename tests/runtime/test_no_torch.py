"""What runs an export imports neither torch nor transformers."""

from __future__ import annotations

import subprocess
import sys

RUNTIME_MODULES = [
    "gemma4_compile.runtime",
    "gemma4_compile.runtime.server",
    "gemma4_compile.runtime.service",
    "gemma4_compile.runtime.commands",
    "gemma4_compile.runtime.batching",
    "gemma4_compile.runtime.images",
    "gemma4_compile.runtime.audio",
]


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys; print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return [m for m in out.stdout.strip().split(",") if m]


def test_runtime_modules_import_neither_torch_nor_transformers():
    assert _loaded_after("\n".join(f"import {m}" for m in RUNTIME_MODULES)) == []


def test_opening_a_runner_imports_neither_torch_nor_transformers(export_dir):
    assert (
        _loaded_after(f"from gemma4_compile.runtime import open_runner; open_runner({str(export_dir)!r})")
        == []
    )


def test_the_validate_package_and_the_memory_probe_import_neither():
    assert _loaded_after("import gemma4_compile.validate, gemma4_compile.validate.memory") == []
