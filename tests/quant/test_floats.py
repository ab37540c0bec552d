"""FP8 E4M3 and NVFP4 codes (quant/floats.py): rounding bounds, the scales' rules, and the packing read back
by onnx's own FLOAT4E2M1 / FLOAT8E4M3FN decoder (not ours)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from gemma4_compile.quant.encode import encode_rows
from gemma4_compile.quant.floats import (
    FP4_MAX,
    FP8_MAX,
    nvfp4_global_scale,
    quantize_fp8_rows,
    quantize_nvfp4_rows,
)


def _weights(n: int = 24, k: int = 80, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * np.exp(rng.uniform(-4, 2, (n, 1))).astype(np.float32)
    w[3, :] = 0.0  # an all-zero row: zero scales, zero codes
    return w


def _onnx_decoded(raw: bytes, data_type: int, shape: tuple[int, ...]) -> np.ndarray:
    tensor = onnx.helper.make_tensor("t", data_type, shape, raw, raw=True)
    return numpy_helper.to_array(tensor).astype(np.float32)


@pytest.mark.parametrize("block", [32, 128])
def test_fp8_puts_each_block_absmax_on_448_and_rounds_within_half_a_step(block):
    w = _weights()
    codes, scales = quantize_fp8_rows(w, block)
    values = codes.astype(np.float32)
    assert np.abs(values).max(axis=2)[scales > 0].min() == FP8_MAX
    deq = (values * scales[..., None]).reshape(w.shape[0], -1)[:, : w.shape[1]]
    # E4M3 keeps 3 mantissa bits: half a step is 2^-4 of the value, or 2^-10 of the scale when subnormal
    bound = np.abs(w) * 2.0**-4 + np.repeat(scales, block, axis=1)[:, : w.shape[1]] * 2.0**-10
    assert (np.abs(deq - w) <= bound * (1 + 1e-6)).all()
    assert not values[3].any() and not scales[3].any()


def test_fp8_bytes_read_back_by_onnx():
    w = _weights()
    raw, _ = encode_rows("fp8", w, 32, "DequantizeLinear")
    codes, _ = quantize_fp8_rows(w, 32)
    decoded = _onnx_decoded(raw, onnx.TensorProto.FLOAT8E4M3FN, (w.shape[0], codes.shape[1] * 32))
    assert np.array_equal(decoded, codes.astype(np.float32).reshape(w.shape[0], -1))


def test_nvfp4_global_scale_lands_the_largest_block_scale_on_448_and_codes_on_the_e2m1_grid():
    w = _weights()
    g = nvfp4_global_scale(float(np.abs(w).max()))
    codes, block_scales = quantize_nvfp4_rows(w, g)
    assert codes.shape == (w.shape[0], 5, 16) and block_scales.shape == (w.shape[0], 5)
    assert block_scales.astype(np.float32).max() == FP8_MAX
    grid = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}
    assert set(np.abs(codes.astype(np.float32)).ravel()) <= grid
    effective = block_scales.astype(np.float32) * g
    deq = (codes.astype(np.float32) * effective[..., None]).reshape(w.shape)
    # E2M1's widest gap is 4 -> 6: at most 1 unit of the effective block scale away, plus its own E4M3 rounding
    blocks_absmax = np.abs(w.reshape(w.shape[0], 5, 16)).max(axis=2)
    bound = np.repeat(effective + blocks_absmax * 2.0**-4, 16, axis=1)
    assert (np.abs(deq - w) <= bound * (1 + 1e-6)).all()


def test_nvfp4_nibbles_read_back_by_onnx_lower_k_first():
    w = _weights()
    g = nvfp4_global_scale(float(np.abs(w).max()))
    raw, _ = encode_rows("nvfp4", w, 16, "DequantizeLinear", g)
    codes, _ = quantize_nvfp4_rows(w, g)
    decoded = _onnx_decoded(raw, onnx.TensorProto.FLOAT4E2M1, w.shape)
    assert np.array_equal(decoded, codes.astype(np.float32).reshape(w.shape))
    assert FP4_MAX in np.abs(decoded)
