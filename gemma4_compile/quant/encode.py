"""One entry point per direction for every format: the bytes the writer stores, and the weights the graph
computes with (the fake-quant reference). numpy only; `scale_dtype` is the graph's scale type by name."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .floats import nvfp4_global_scale, pack_fp4, quantize_fp8_rows, quantize_nvfp4_rows
from .formats import BITS, GRAPH_NBITS
from .rtn import pack_matmulnbits, pack_matmulnbits_split, pack_signed, quantize_rows

_NUMPY = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}


def rounded(x: np.ndarray | float, dtype: str) -> np.ndarray:
    """x rounded to the export dtype `dtype` ("fp32" | "fp16" | "bf16"), back as float32."""
    return np.asarray(x, dtype=np.float32).astype(_NUMPY[dtype]).astype(np.float32)


def global_scale(absmax: float, dtype: str) -> float:
    """nvfp4's tensor-wide scale as the graph stores it (in the export dtype)."""
    return float(rounded(nvfp4_global_scale(absmax), dtype))


def _codes(
    fmt: str, w: np.ndarray, block_size: int, graph: str, g: float | None, method: str
) -> tuple[np.ndarray, np.ndarray]:
    """(codes [N, blocks, block] as ints or ml_dtypes floats, scales [N, blocks] float32 or E4M3)."""
    if fmt == "fp8":
        return quantize_fp8_rows(w, block_size)
    if fmt == "nvfp4":
        return quantize_nvfp4_rows(w, g)
    return quantize_rows(w, BITS[fmt], block_size, positive=graph != GRAPH_NBITS, method=method)


def encode_rows(
    fmt: str,
    w: np.ndarray,
    block_size: int,
    graph: str,
    g: float | None = None,
    method: str = "rtn",
    split: bool = False,
) -> tuple[bytes, np.ndarray]:
    """w float32 [N, K] -> (the packed codes as stored, scales float32 [N, blocks]); `g`: nvfp4's global scale
    (its scales are E4M3 values, exact in float32); `method`: the integer formats' scale rule (rtn.py); `split`:
    8-bit MatMulNBits codes as two 4-bit rows each (formats.py `splits_int8`)."""
    codes, scales = _codes(fmt, w, block_size, graph, g, method)
    if fmt == "fp8":
        packed = codes.view(np.uint8)
    elif fmt == "nvfp4":
        packed = pack_fp4(codes)
    elif graph == GRAPH_NBITS:
        packed = pack_matmulnbits_split(codes) if split else pack_matmulnbits(codes, BITS[fmt])
    else:
        packed = pack_signed(codes, BITS[fmt])
    return packed.tobytes(), scales.astype(np.float32)


def dequantized_rows(
    fmt: str,
    w: np.ndarray,
    block_size: int,
    graph: str,
    dtype: str,
    g: float | None = None,
    method: str = "rtn",
) -> np.ndarray:
    """w [N, K] -> the weight the graph computes with, float32: codes x scales, the scales rounded as the graph
    stores them (MatMulNBits: fp32; DequantizeLinear: the export dtype; nvfp4: E4M3 x the global, rounded)."""
    n, k = w.shape
    codes, scales = _codes(fmt, w, block_size, graph, g, method)
    scales = scales.astype(np.float32)
    if fmt == "nvfp4":
        scales = rounded(scales * np.float32(g), dtype)  # the first DequantizeLinear's output
    elif graph != GRAPH_NBITS:
        scales = rounded(scales, dtype)
    deq = codes.astype(np.float32) * scales[..., None]
    return deq.reshape(n, -1)[:, :k]


__all__ = ["dequantized_rows", "encode_rows", "global_scale", "rounded"]
