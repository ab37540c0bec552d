"""Round-to-nearest symmetric per-block quantization, and packing in com.microsoft.MatMulNBits layout.

A torch Linear weight W is [N, K] (out, in); blocks run along K, so a row chunk of W quantizes on its own and
the writer can stream. Codes are signed (int4: -8..7, int8: -128..127), no zero point, and the scale of a block
is its signed absmax divided by the most negative code (ggml Q4_0's and onnxruntime's rule: the largest
magnitude lands exactly on the grid's -8 end). K is padded with zeros to whole blocks.

MatMulNBits stores the codes unsigned with an implied zero point of 2^(bits-1): u = q + 8 (int4) or q + 128
(int8); int4 packs two codes per byte, the lower k in the low nibble. ONNX INT4 / INT8 (DequantizeLinear, the
TensorRT form) stores the signed codes themselves, packed the same way: for int4 the two streams differ by
XOR 0x88 per byte (q + 8 and q's two's complement nibble differ in the top bit only).
"""

from __future__ import annotations

import numpy as np


def num_blocks(k: int, block_size: int) -> int:
    return -(-k // block_size)


# `--quant-method mse`: each block's scale is the absmax rule's times the one of these factors whose codes
# reconstruct the block with the least squared error (llama.cpp's make_qx_quants idea: clipping the largest
# values a little buys a finer grid for the rest). 1.0 is in the grid, so no block gets worse than RTN. The
# best factor sits near 1 - 1/levels: int8's search is a narrow one (measured on Gaussian rows, test_rtn.py).
MSE_GRID = {4: np.linspace(0.7, 1.0, 13, dtype=np.float32), 8: np.linspace(0.97, 1.0, 13, dtype=np.float32)}


def to_blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """w [N, K] -> float32 [N, blocks, block_size], K padded with zeros to whole blocks."""
    n, k = w.shape
    padded = np.zeros((n, num_blocks(k, block_size) * block_size), dtype=np.float32)
    padded[:, :k] = w
    return padded.reshape(n, -1, block_size)


def per_block(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks / scales, block by block; an all-zero block (scale 0) gives 0."""
    return blocks / np.where(scales == 0, 1.0, scales)[..., None]


def pack_nibbles(u: np.ndarray) -> np.ndarray:
    """4-bit codes in the low bits of uint8 [..., even] -> uint8 [..., half], the lower k in the low nibble."""
    u = u & 0x0F
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def _codes(blocks: np.ndarray, scales: np.ndarray, lo: int) -> np.ndarray:
    return np.clip(np.rint(per_block(blocks, scales)), lo, -lo - 1).astype(np.int8)


def _mse_scales(blocks: np.ndarray, scales: np.ndarray, lo: int, bits: int) -> np.ndarray:
    best, best_err = scales, np.full(scales.shape, np.inf, dtype=np.float32)
    for factor in MSE_GRID[bits]:
        trial = (scales * factor).astype(np.float32)
        err = ((_codes(blocks, trial, lo) * trial[..., None] - blocks) ** 2).sum(axis=2)
        better = err < best_err
        best, best_err = np.where(better, trial, best), np.where(better, err, best_err)
    return best


def quantize_rows(
    w: np.ndarray, bits: int, block_size: int, positive: bool = False, method: str = "rtn"
) -> tuple[np.ndarray, np.ndarray]:
    """w float [N, K] -> (codes int8 [N, blocks, block_size], scales float32 [N, blocks]).

    `positive`: TensorRT's DequantizeLinear refuses negative scales, so its rule is absmax / (2^(bits-1) - 1),
    a grid of -7..7 (int4) that leaves -8 unused; otherwise the signed-absmax rule of the module docstring.
    `method` "mse": the scale factor of MSE_GRID with the least squared error, per block."""
    blocks = to_blocks(w, block_size)
    lo = -(1 << (bits - 1))
    if positive:
        scales = (np.abs(blocks).max(axis=2) / (-lo - 1)).astype(np.float32)
    else:
        idx = np.abs(blocks).argmax(axis=2)[..., None]
        scales = (np.take_along_axis(blocks, idx, axis=2)[..., 0] / lo).astype(np.float32)
    if method == "mse":
        scales = _mse_scales(blocks, scales, lo, bits)
    return _codes(blocks, scales, lo), scales


def dequantize_rows(codes: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """The fake-quant weight: codes * scales, [N, K] float32 (the inverse of quantize_rows up to rounding)."""
    n = codes.shape[0]
    return (codes.astype(np.float32) * scales[..., None]).reshape(n, -1)[:, :k]


def pack_matmulnbits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Signed codes [N, blocks, block_size] -> MatMulNBits B, uint8 [N, blocks, block_size * bits / 8]."""
    u = (codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    return u if bits == 8 else pack_nibbles(u)


def pack_matmulnbits_split(codes: np.ndarray) -> np.ndarray:
    """Signed 8-bit codes [N, blocks, block] -> two 4-bit MatMulNBits rows per row, uint8 [2N, blocks, block / 2]:
    row 2n holds the high nibbles of c + 128 (read with zero point 8: floor(c / 16)), row 2n + 1 the low ones
    (zero point 0: c mod 16), so c = 16 * high + low (passes/quantize_matmul.py, `nbits_matmul`)."""
    u = pack_matmulnbits(codes, 8)  # c + 128
    packed = pack_nibbles(np.stack([u >> 4, u & 0x0F], axis=1))  # [N, 2, blocks, block / 2]
    return packed.reshape(-1, *packed.shape[2:])


def pack_signed(codes: np.ndarray, bits: int) -> np.ndarray:
    """Signed codes [N, blocks, block_size] -> ONNX INT8 bytes, or INT4 two's complement nibbles (low first)."""
    u = codes.astype(np.int8).view(np.uint8)
    return u if bits == 8 else pack_nibbles(u)


def fake_quantize(w: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """w [N, K] -> the weight the quantized graph computes with."""
    codes, scales = quantize_rows(w, bits, block_size)
    return dequantize_rows(codes, scales, w.shape[1])
