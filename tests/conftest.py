"""Shared fixtures: random tiny checkpoints and exports, made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

# Triton kernels run on the CPU interpreter in tests (set before anything imports triton; a GPU machine
# can run them compiled with TRITON_INTERPRET=0).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from gemma4_compile.model.checkpoint import write_random_checkpoint
from gemma4_compile.model.presets import PRESETS, TINY_PRESETS


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(preset, dtype=torch.float32, seed=0) -> directory (cached per arguments)."""
    cache: dict[tuple, Path] = {}

    def make(preset: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
        key = (preset, dtype, seed)
        if key not in cache:
            path = tmp_path_factory.mktemp("ckpt") / f"{preset}-{str(dtype)[6:]}-{seed}"
            write_random_checkpoint(PRESETS[preset], path, seed=seed, dtype=dtype)
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def make_export(tmp_path_factory, make_checkpoint):
    """make_export(preset, dtype="fp32", debug=False, lowering=None) -> export directory (cached)."""
    from gemma4_compile.export import export_checkpoint

    cache: dict[tuple, Path] = {}

    def make(preset: str, dtype: str = "fp32", debug: bool = False, lowering: str | None = None) -> Path:
        key = (preset, dtype, debug, lowering)
        if key not in cache:
            out = tmp_path_factory.mktemp("export") / f"{preset}-{dtype}-{int(debug)}-{lowering}"
            export_checkpoint(
                make_checkpoint(preset), out, dtype=dtype, debug=debug, lowering=lowering, max_seq_len=256
            )
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(params=TINY_PRESETS)
def tiny_preset(request) -> str:
    return request.param
