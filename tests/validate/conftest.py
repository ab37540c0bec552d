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


@pytest.fixture(scope="session")
def media_references(make_vision_export):
    """media_references(preset) -> (checkpoint, export, transformers fp32, transformers fp64) of the preset's
    vision (+audio) export, made once per session and shared by the image and audio validation tests."""
    import copy

    from gemma4_compile.validate.images import load_reference

    cache = {}

    def get(preset: str):
        if preset not in cache:
            ckpt, out = make_vision_export(preset)
            hf = load_reference(ckpt)
            cache[preset] = ckpt, out, hf, copy.deepcopy(hf).double()
        return cache[preset]

    return get


@pytest.fixture(scope="session")
def half_media(make_vision_export):
    """(checkpoint, fp16 export, transformers fp32, transformers fp16) of tiny-e2b's vision+audio checkpoint:
    the reduced-precision gates' fixtures (the fp16 model is the twin that measures transformers' own
    fp16 round-off)."""
    from gemma4_compile.validate.images import load_reference, reference_twin

    ckpt, out = make_vision_export("tiny-e2b", "fp16")
    hf = load_reference(ckpt)
    return ckpt, out, hf, reference_twin(hf, "fp16")
