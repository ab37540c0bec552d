"""The floating-point weight formats of the TensorRT form: FP8 E4M3 and NVFP4 (FP4 E2M1 with FP8 block scales).

FP8: each block of `block_size` values along K gets the scale absmax / 448 (E4M3's largest finite value) and the
codes are w / scale rounded to nearest-even E4M3; the graph is DequantizeLinear(FLOAT8E4M3FN codes, scales).

NVFP4 (NVIDIA's layout, the one ModelOpt writes): blocks of 16 along K; a tensor-wide fp32 "global" scale
absmax / (448 * 6) lets each block's own scale absmax_b / 6 / global be stored in E4M3, and the codes are
w / (block scale * global) rounded to nearest E2M1 (values 0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6). The graph is two
DequantizeLinear: the block scales by the global one, then the codes by the result (opset 23, FLOAT4E2M1).
FP4 codes pack two per byte, the lower k in the low nibble, as ONNX and ml_dtypes store them.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .rtn import pack_nibbles, per_block, to_blocks

FP8 = ml_dtypes.float8_e4m3fn
FP4 = ml_dtypes.float4_e2m1fn
FP8_MAX = 448.0
FP4_MAX = 6.0
NVFP4_BLOCK = 16


def quantize_fp8_rows(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] -> (codes float8_e4m3fn [N, blocks, block_size], scales float32 [N, blocks])."""
    blocks = to_blocks(w, block_size)
    scales = (np.abs(blocks).max(axis=2) / FP8_MAX).astype(np.float32)
    codes = np.clip(per_block(blocks, scales), -FP8_MAX, FP8_MAX).astype(FP8)
    return codes, scales


def nvfp4_global_scale(absmax: float) -> np.float32:
    """The tensor-wide scale: the largest block scale (absmax / 6) then lands on E4M3's 448."""
    return np.float32(absmax / (FP8_MAX * FP4_MAX) if absmax > 0 else 1.0)


def quantize_nvfp4_rows(w: np.ndarray, global_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] -> (codes float4_e2m1fn [N, blocks, 16], block scales float8_e4m3fn [N, blocks]).

    `global_scale` is the value the graph multiplies by (already rounded to the scale's dtype)."""
    blocks = to_blocks(w, NVFP4_BLOCK)
    block_scales = np.clip(np.abs(blocks).max(axis=2) / FP4_MAX / global_scale, 0, FP8_MAX).astype(FP8)
    effective = block_scales.astype(np.float32) * np.float32(global_scale)
    codes = np.clip(per_block(blocks, effective), -FP4_MAX, FP4_MAX).astype(FP4)
    return codes, block_scales


def pack_fp4(codes: np.ndarray) -> np.ndarray:
    """float4_e2m1fn [..., even] -> uint8 [..., half]: two codes per byte, the lower k in the low nibble."""
    return pack_nibbles(codes.view(np.uint8))
