"""Fixtures for the validator tests: one torch thread (tiny models on a shared 2-core machine run ~10x faster
without OpenMP spinning), and cached runners."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def torch_runner(make_checkpoint):
    """torch_runner(preset, dtype="fp32") -> TorchRunner (cached)."""
    from gemma4_compile.validate import TorchRunner

    cache = {}

    def make(preset: str, dtype: str = "fp32") -> TorchRunner:
        if (preset, dtype) not in cache:
            cache[preset, dtype] = TorchRunner(make_checkpoint(preset), dtype)
        return cache[preset, dtype]

    return make
