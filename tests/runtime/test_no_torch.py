"""What runs an export imports neither torch nor transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gemma4_compile.targets import local_device_sm

RUNTIME_MODULES = [
    "gemma4_compile.runtime",
    "gemma4_compile.runtime.server",
    "gemma4_compile.runtime.service",
    "gemma4_compile.runtime.commands",
    "gemma4_compile.runtime.batching",
    "gemma4_compile.runtime.images",
    "gemma4_compile.runtime.audio",
]
# what the TensorRT backend imports to run an engine (docs/tensorrt.md)
TRT_MODULES = [
    "gemma4_compile.runners",
    "gemma4_compile.runners.base",
    "gemma4_compile.runners.cuda",
    "gemma4_compile.runners.trt",
    "gemma4_compile.engines.load",
    "gemma4_compile.engines.seam",
    "gemma4_compile.runtime.backend",
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


def test_the_tensorrt_runner_modules_import_neither():
    assert _loaded_after("\n".join(f"import {m}" for m in TRT_MODULES)) == []


@pytest.mark.skipif(local_device_sm() is not None, reason="this machine has a CUDA GPU: TrtRunner would open")
def test_constructing_the_tensorrt_runner_without_a_gpu_refuses_without_torch(export_dir):
    code = (
        "from gemma4_compile.errors import BackendUnavailable\n"
        "from gemma4_compile.runners.trt import TrtRunner\n"
        "try:\n"
        f"    TrtRunner({str(export_dir)!r}, 'sm89')\n"
        "except BackendUnavailable as e:\n"
        "    assert str(e).startswith('trt: needs a CUDA GPU'), e\n"
        "else:\n"
        "    raise SystemExit('TrtRunner opened without a GPU')"
    )
    assert _loaded_after(code) == []
