"""Fixtures for engine tests: synthetic exports (always) and real tiny exports (once the exporter exists).

TensorRT-RTX is real here: it parses and builds engines on the CPU. Nothing is mocked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from engines_support import has_exporter
from engines_synthetic import write_synthetic_export


@pytest.fixture(scope="session")
def synthetic_exports(tmp_path_factory):
    """dtype -> a pristine synthetic export directory (copy it before building into it)."""
    root = tmp_path_factory.mktemp("synthetic")
    return {dtype: write_synthetic_export(root / dtype, dtype, max_seq_len=64) for dtype in ("fp16", "bf16")}


@pytest.fixture
def fresh_export(synthetic_exports, tmp_path):
    """A private copy of a synthetic export, so each test builds into its own OUT/engines."""

    def make(dtype: str = "fp16") -> Path:
        dst = tmp_path / f"export-{dtype}"
        shutil.copytree(synthetic_exports[dtype], dst)
        return dst

    return make


@pytest.fixture(scope="session")
def real_exports(tmp_path_factory):
    """(preset, dtype) -> a real export of a random tiny checkpoint, made once per session."""
    if not has_exporter():
        pytest.skip("gemma4_compile.export.export_checkpoint is not available yet")
    import torch

    from gemma4_compile.export import export_checkpoint
    from gemma4_compile.model.checkpoint import write_random_checkpoint
    from gemma4_compile.model.presets import PRESETS

    root = tmp_path_factory.mktemp("real")
    made: dict[tuple[str, str], Path] = {}

    def get(preset: str, dtype: str) -> Path:
        if (preset, dtype) not in made:
            ckpt = root / f"ckpt-{preset}"
            if not ckpt.exists():
                write_random_checkpoint(PRESETS[preset], ckpt, seed=0, dtype=torch.float32)
            out = root / f"{preset}-{dtype}"
            export_checkpoint(ckpt, out, dtype=dtype, max_seq_len=64)
            made[(preset, dtype)] = out
        return made[(preset, dtype)]

    return get
