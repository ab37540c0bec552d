"""Quantized exports of the tiny presets, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemma4_compile.quant.formats import QuantRequest


@pytest.fixture(scope="session")
def make_quant_export(tmp_path_factory, make_checkpoint):
    """make_quant_export(preset, format, block_size=32, keep=(), dtype="fp32") -> export directory (cached);
    fp32 makes the onnxruntime form (MatMulNBits), fp16/bf16 the TensorRT one (DequantizeLinear)."""
    from gemma4_compile.export import export_checkpoint

    cache: dict[tuple, Path] = {}

    def make(
        preset: str, fmt: str, block_size: int = 32, keep: tuple[str, ...] = (), dtype: str = "fp32"
    ) -> Path:
        key = (preset, fmt, block_size, keep, dtype)
        if key not in cache:
            out = tmp_path_factory.mktemp("quant") / f"{preset}-{fmt}-b{block_size}-{'-'.join(keep)}-{dtype}"
            request = QuantRequest(fmt, block_size, keep)
            export_checkpoint(make_checkpoint(preset), out, dtype=dtype, max_seq_len=128, quant=request)
            cache[key] = out
        return cache[key]

    return make
