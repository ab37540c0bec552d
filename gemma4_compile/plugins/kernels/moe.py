"""Triton kernels for `gemma4::moe`: routing, sort by expert, grouped GEMMs with a GELU-tanh GLU, weighted combine.

The math is `ops.moe_reference` (T tokens, H hidden, E experts, K = top_k, I expert width):

    p = softmax(router_logits[t]) over all E (fp32);  (w, idx) = top_K(p);  w /= sum(w);  w *= per_expert_scale[idx]
    y[t] = sum_k w[t,k] * down[idx_k] @ (gelu_tanh(gate[idx_k] @ x[t]) * (up[idx_k] @ x[t]))
    gate = gate_up[e][0:I], up = gate_up[e][I:2I];  gelu_tanh(u) = u * sigmoid(2 sqrt(2/pi) (u + 0.044715 u^3))

Pipeline (work and weight traffic grow with the T*K routed pairs; an expert no token picked is never read):

1. `_moe_route_kernel`   per token: fp32 softmax over E, K rounds of argmax (ties: lowest expert id), renormalize,
                         scale. Writes weights [T, K] fp32 and expert ids [T, K] int32.
2. `_moe_count_kernel`   per block of BLOCK_P pairs (pair i = t*K + k): a histogram of its expert ids.
3. `_moe_offsets_kernel` one program: prefix sums over blocks and experts -> where each block's pairs of expert e
                         start, ExpertOffsets [E+1] (rows of each expert in the sorted order) and TileOffsets [E+1]
                         (BLOCK_M row tiles per expert, the grouped GEMMs' work list).
4. `_moe_scatter_kernel` stable counting sort: SortedPairs[row] = pair, PairRows[pair] = row; rows are grouped by
                         expert, pairs in token order inside an expert (as the reference's torch.where).
5. `_moe_gate_up_kernel` grouped GEMM over (row tile, I tile): gathers x rows of its pairs, h = gelu_tanh(x gate^T)
                         * (x up^T) with both halves accumulated in fp32 in one pass over H.
6. `_moe_down_kernel`    grouped GEMM over (row tile, H tile): out_row = w_pair * (h down^T), stored in x's dtype.
7. `_moe_combine_kernel` y[t] = sum_k out_row[PairRows[t*K + k]] in fp32: a gather, so no atomics and the same
                         bits every run.

Quantized experts (`QuantizedExperts`: the export's int4 / fp8 `moe_experts` codes with their block scales along K)
run through the same two GEMM kernels: the constexpr WEIGHT_FORMAT ("float" | "int4" | "fp8") and QBLOCK pick how
`_weight_tile` loads a [BLOCK_N, BLOCK_K] tile inside the K loop (decode codes, times their block scales in fp32,
rounded once to the activations' dtype, then tl.dot accumulating in fp32); the float path loads exactly as before.

per_expert_scale still multiplies the fp32 routing weight (route, one multiply per routed pair). A quantized
export has already folded it into the down experts' block scales before rounding (quant/formats.py
`expert_scale_folds`) and feeds ones here, so these kernels read exactly the DequantizeLinear graph's weights.

The grouped GEMMs launch cdiv(T*K, BLOCK_M) + E row-tile programs, an upper bound of the true tile count that
needs no device-to-host sync; programs past TileOffsets[E] exit at once. Kernel arguments are ordered inputs,
int32 scalars, outputs (TensorRT QDP `aot_impl` order); each kernel is one launch, so each stage can be a plugin.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...errors import Gemma4CompileError
from ...ops.moe import STAGE_KERNELS
from ...targets import local_target
from ..shapes import cdiv

BLOCK_P = 128  # routed pairs per sort program
GELU_K = tl.constexpr(
    1.5957691216057308
)  # 2 sqrt(2 / pi): gelu_tanh(u) = u * sigmoid(GELU_K (u + 0.044715 u^3))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----- 1. routing ---------------------------------------------------------------------------------------


@triton.jit
def _moe_route_kernel(
    Logits_ptr, Scale_ptr, logits_stride_t, num_tokens, num_experts, Weights_ptr, Ids_ptr,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """weights[t] = renorm(top_K(softmax(logits[t]))) * scale[ids[t]], ids[t] = argtop_K.  grid = (cdiv(T, BLOCK_T),)"""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    t_ok = t < num_tokens
    e_ok = e < num_experts
    x = tl.load(Logits_ptr + t[:, None].to(tl.int64) * logits_stride_t + e[None, :],
                mask=t_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
    x = tl.where(e_ok[None, :], x, float("-inf"))
    z = tl.exp(x - tl.max(x, 1)[:, None])
    p = z / tl.sum(z, 1)[:, None]
    p = tl.where(e_ok[None, :], p, -1.0)  # padding experts are never picked
    kk = tl.arange(0, K_PAD)
    w = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(p, 1)
        arg = tl.min(tl.where(p == best[:, None], e[None, :], BLOCK_E), 1)
        w = tl.where(kk[None, :] == k, best[:, None], w)
        ids = tl.where(kk[None, :] == k, arg[:, None], ids)
        p = tl.where(e[None, :] == arg[:, None], -1.0, p)
    w = w / tl.sum(w, 1)[:, None]
    k_ok = kk < TOP_K
    w = w * tl.load(Scale_ptr + ids, mask=k_ok[None, :], other=0.0).to(tl.float32)
    out = t[:, None] * TOP_K + kk[None, :]
    mask = t_ok[:, None] & k_ok[None, :]
    tl.store(Weights_ptr + out, w, mask=mask)
    tl.store(Ids_ptr + out, ids, mask=mask)


# ----- 2-4. counting sort by expert ---------------------------------------------------------------------


@triton.jit
def _moe_count_kernel(Ids_ptr, num_pairs, BlockCounts_ptr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """BlockCounts[b, e] = #{pairs i in block b: ids[i] == e}.   grid = (cdiv(T*K, BLOCK_P),)"""
    i = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    e = tl.arange(0, BLOCK_E)
    ids = tl.load(Ids_ptr + i, mask=i < num_pairs, other=-1)
    counts = tl.sum((ids[:, None] == e[None, :]).to(tl.int32), 0)
    tl.store(BlockCounts_ptr + tl.program_id(0) * BLOCK_E + e, counts)


@triton.jit
def _moe_offsets_kernel(
    BlockCounts_ptr, num_blocks, num_experts, BlockOffsets_ptr, ExpertOffsets_ptr, TileOffsets_ptr,
    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Exclusive prefix sums: BlockOffsets[b, e] = sum_{b' < b} BlockCounts[b', e];  with n_e = pairs of expert e,
    ExpertOffsets[e] = sum_{e' < e} n_e', ExpertOffsets[E] = T*K;  TileOffsets[e] = sum_{e' < e} cdiv(n_e',
    BLOCK_M), TileOffsets[E] = row tiles in all.   grid = (1,)"""
    e = tl.arange(0, BLOCK_E)
    running = tl.zeros([BLOCK_E], dtype=tl.int32)
    for b0 in range(0, num_blocks, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        ok = (b < num_blocks)[:, None]
        idx = b[:, None] * BLOCK_E + e[None, :]
        c = tl.load(BlockCounts_ptr + idx, mask=ok, other=0)
        tl.store(BlockOffsets_ptr + idx, running[None, :] + tl.cumsum(c, 0) - c, mask=ok)
        running += tl.sum(c, 0)
    e_ok = e < num_experts
    tl.store(ExpertOffsets_ptr + e, tl.cumsum(running, 0) - running, mask=e_ok)
    tl.store(ExpertOffsets_ptr + num_experts, tl.sum(running, 0))
    tiles = (running + BLOCK_M - 1) // BLOCK_M
    tl.store(TileOffsets_ptr + e, tl.cumsum(tiles, 0) - tiles, mask=e_ok)
    tl.store(TileOffsets_ptr + num_experts, tl.sum(tiles, 0))


@triton.jit
def _moe_scatter_kernel(
    Ids_ptr, BlockOffsets_ptr, ExpertOffsets_ptr, num_pairs, SortedPairs_ptr, PairRows_ptr,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """row(i) = ExpertOffsets[e] + BlockOffsets[b, e] + #{i' < i in block b: ids[i'] == e}, e = ids[i]:
    SortedPairs[row] = i, PairRows[i] = row.   grid = (cdiv(T*K, BLOCK_P),)"""
    i = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = i < num_pairs
    e = tl.arange(0, BLOCK_E)
    ids = tl.load(Ids_ptr + i, mask=ok, other=-1)
    onehot = (ids[:, None] == e[None, :]).to(tl.int32)
    rank = tl.sum((tl.cumsum(onehot, 0) - onehot) * onehot, 1)
    base = tl.load(ExpertOffsets_ptr + ids, mask=ok, other=0)
    base += tl.load(BlockOffsets_ptr + tl.program_id(0) * BLOCK_E + ids, mask=ok, other=0)
    row = base + rank
    tl.store(SortedPairs_ptr + row, i, mask=ok)
    tl.store(PairRows_ptr + i, row, mask=ok)


# ----- 5-6. grouped GEMMs ------------------------------------------------------------------------------


@triton.jit
def _tile_rows(
    pid_m, ExpertOffsets_ptr, TileOffsets_ptr, num_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr
):
    """Row tile pid_m of the work list -> (expert e, sorted rows of the tile, their mask)."""
    e_all = tl.arange(0, BLOCK_E)
    starts = tl.load(TileOffsets_ptr + e_all, mask=e_all < num_experts, other=2147483647)
    e = tl.sum((starts <= pid_m).to(tl.int32), 0) - 1  # last expert whose first tile is <= pid_m
    row0 = tl.load(ExpertOffsets_ptr + e) + (pid_m - tl.load(TileOffsets_ptr + e)) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    return e, rows, rows < tl.load(ExpertOffsets_ptr + e + 1)


# Tiles (BLOCK_M routed rows x BLOCK_N outputs x BLOCK_K reduction, warps, stages), one for both GEMMs (the
# work list is cut in BLOCK_M row tiles), picked from an H200 sweep (benchmarks/gpu_kernels.py --sweep, RESULTS.md).
# Decode-like batches route ~1 row to each expert: 16-row tiles, 32 outputs wide so the few hit experts still
# make enough programs (int4 0.57x the time of 64 wide, float and fp8 0.86-0.97x; int4 a further 0.89x with
# 256-deep K tiles where they fit). Prefill routes hundreds: 128-row tiles where a Hopper-class part has the
# shared memory ((BM + 2 BN) BK 2 B per stage for gate_up: float / fp8 0.84-0.89x of 64 rows), narrower and
# with 8 warps for int4, whose in-loop nibble decode, not the MMA, is the cost (0.44x of the 64x128 tile);
# 64-row tiles elsewhere. ptxas reports no spills for these on sm80..sm120.


def gemm_configs(
    rows_per_expert: float, max_shared_bytes: int = 99 * 1024, weight_format: str = "float"
) -> list[triton.Config]:
    """Tile candidates for `_moe_gate_up_kernel` / `_moe_down_kernel`, best first, for a target's shared memory
    and the experts' format (the AOT stage plugins take float experts)."""
    big = max_shared_bytes >= 160 * 1024
    if rows_per_expert <= 16:
        shapes = [(16, 32, 128, 4, 4), (16, 32, 64, 4, 4)]
        if big and weight_format == "int4":
            shapes.insert(0, (16, 32, 256, 4, 3))
    elif not big:
        shapes = [(64, 64, 64, 4, 3)]
    elif rows_per_expert < 128:
        shapes = [(64, 128, 64, 8, 3), (64, 64, 64, 4, 3)]
    elif weight_format == "int4":
        shapes = [(128, 64, 64, 8, 4), (64, 64, 64, 4, 3)]
    else:
        shapes = [(128, 128, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
            for m, n, k, w, st in shapes]  # fmt: skip


def keep_gemm(conf: triton.Config, out_features: int, reduction: int) -> bool:
    """Drop tiles wider than the problem (the tiny test models have H = 64)."""
    n, k = conf.kwargs["BLOCK_N"], conf.kwargs["BLOCK_K"]
    return n <= max(16, triton.next_power_of_2(out_features)) and k <= max(
        16, triton.next_power_of_2(reduction)
    )


def gemm_tile(
    rows_per_expert: float, max_shared_bytes: int, width: int | None = None, weight_format: str = "float"
) -> triton.Config:
    """The one GEMM tile choice of the torch wrapper, `gemma4-compile kernels` and the stage plugins: the first
    candidate for the routed rows, the target's shared memory and the experts' format, no wider than the problem
    when its width (min(H, I)) is known; AOT variants are compiled before the width is, and Gemma 4's never
    prunes a tile."""
    confs = gemm_configs(rows_per_expert, max_shared_bytes, weight_format)
    if width is None:
        return confs[0]
    return next((c for c in confs if keep_gemm(c, width, width)), confs[-1])


@triton.jit
def _weight_tile(
    w_ptr, s_ptr, k0, reduction, n_ok,
    WEIGHT_FORMAT: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_K: tl.constexpr, OUT_DTYPE: tl.constexpr,
):  # fmt: skip
    """Expert rows w_ptr [BLOCK_N, 1] at k0 + arange(BLOCK_K) -> [BLOCK_N, BLOCK_K] in OUT_DTYPE.

    "float": the weights as stored. "int4" / "fp8" (the export's moe_experts layout, QuantizedExperts): decode the
    tile's codes, multiply by their block scales (s_ptr [BLOCK_N, 1]: the rows' scales, one per QBLOCK along K)
    in fp32 and round once to OUT_DTYPE, so no full-precision expert is ever written to memory. int4 packs two
    two's complement nibbles per byte, the lower k in the low nibble: BLOCK_K // 2 bytes per row.
    """
    kk = k0 + tl.arange(0, BLOCK_K)
    mask = n_ok[:, None] & (kk < reduction)[None, :]
    if WEIGHT_FORMAT == "float":
        w = tl.load(w_ptr + kk[None, :], mask=mask, other=0.0)
    else:
        if WEIGHT_FORMAT == "int4":
            kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            b = tl.load(w_ptr + kb[None, :], mask=n_ok[:, None] & (kb * 2 < reduction)[None, :], other=0)
            b = b.to(tl.int8, bitcast=True)
            q = tl.interleave((b << 4) >> 4, b >> 4).to(tl.float32)  # arithmetic shifts sign-extend
        else:  # fp8 E4M3
            q = tl.load(w_ptr + kk[None, :], mask=mask, other=0.0).to(tl.float32)
        # one scale per row and QBLOCK codes, broadcast in registers: a [BLOCK_N, BLOCK_K] gather of scales
        # cost more than the dot it fed (7.6x the float kernel at 4096 tokens on an H200, RESULTS.md)
        if QBLOCK >= BLOCK_K:  # the tile lies in one block (k0 is a multiple of BLOCK_K, both powers of two)
            s = tl.load(s_ptr + k0 // QBLOCK, mask=n_ok[:, None], other=0.0).to(tl.float32)
            w = (q * s).to(OUT_DTYPE)
        else:
            kb_s = k0 // QBLOCK + tl.arange(0, BLOCK_K // QBLOCK)
            nblocks = (reduction + QBLOCK - 1) // QBLOCK
            s = tl.load(s_ptr + kb_s[None, :], mask=n_ok[:, None] & (kb_s < nblocks)[None, :], other=0.0)
            q3 = tl.reshape(q, [q.shape[0], BLOCK_K // QBLOCK, QBLOCK])
            w = tl.reshape(q3 * s.to(tl.float32)[:, :, None], [q.shape[0], BLOCK_K]).to(OUT_DTYPE)
    return w


# The quantized operands' scale pointers (GateUpScales_ptr, DownScales_ptr) come after the outputs: the AOT
# stage plugins take float experts and compile them as constexpr None (plugins/aot.py, KernelSpec.absent), so
# the launch contract (inputs, int32 scalars, outputs) is unchanged. Scales are contiguous [E, N, cdiv(K,
# QBLOCK)]; the codes use the weight's strides (in bytes for int4).


@triton.jit
def _moe_gate_up_kernel(
    X_ptr, GateUp_ptr, SortedPairs_ptr, ExpertOffsets_ptr, TileOffsets_ptr,
    x_stride_t, gu_stride_e, gu_stride_n, h_stride, hidden, inter, num_experts,
    H_ptr, GateUpScales_ptr,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr, INPUT_PRECISION: tl.constexpr, WEIGHT_FORMAT: tl.constexpr, QBLOCK: tl.constexpr,
):  # fmt: skip
    """h[row, n] = gelu_tanh(x[tok] . gate_up[e, n]) * (x[tok] . gate_up[e, I + n]), tok = SortedPairs[row] // K.

    grid = (cdiv(T*K, BLOCK_M) + E, cdiv(I, BLOCK_N))
    """
    pid_m = tl.program_id(0)
    if pid_m < tl.load(TileOffsets_ptr + num_experts):
        e, rows, r_ok = _tile_rows(pid_m, ExpertOffsets_ptr, TileOffsets_ptr, num_experts, BLOCK_M, BLOCK_E)
        tok = tl.load(SortedPairs_ptr + rows, mask=r_ok, other=0) // TOP_K
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < inter
        a_ptr = X_ptr + tok[:, None].to(tl.int64) * x_stride_t
        w_ptr = GateUp_ptr + e.to(tl.int64) * gu_stride_e + n[:, None].to(tl.int64) * gu_stride_n
        sg_ptr = GateUpScales_ptr  # None for float weights
        su_ptr = GateUpScales_ptr
        if WEIGHT_FORMAT != "float":
            kb = (hidden + QBLOCK - 1) // QBLOCK
            sg_ptr = GateUpScales_ptr + (e.to(tl.int64) * 2 * inter + n[:, None]) * kb
            su_ptr = sg_ptr + inter * kb
        dt = X_ptr.dtype.element_ty
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < hidden
            a = tl.load(a_ptr + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            wg = _weight_tile(w_ptr, sg_ptr, k0, hidden, n_ok, WEIGHT_FORMAT, QBLOCK, BLOCK_K, dt)
            wu = _weight_tile(
                w_ptr + inter * gu_stride_n, su_ptr, k0, hidden, n_ok, WEIGHT_FORMAT, QBLOCK, BLOCK_K, dt
            )
            acc_g = tl.dot(a, tl.trans(wg), acc_g, input_precision=INPUT_PRECISION)
            acc_u = tl.dot(a, tl.trans(wu), acc_u, input_precision=INPUT_PRECISION)
        u = GELU_K * (acc_g + 0.044715 * acc_g * acc_g * acc_g)
        h = acc_g * tl.sigmoid(u) * acc_u
        tl.store(H_ptr + rows[:, None].to(tl.int64) * h_stride + n[None, :], h.to(H_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & n_ok[None, :])  # fmt: skip


@triton.jit
def _moe_down_kernel(
    H_ptr, Down_ptr, SortedPairs_ptr, Weights_ptr, ExpertOffsets_ptr, TileOffsets_ptr,
    h_stride, dn_stride_e, dn_stride_n, out_stride, hidden, inter, num_experts,
    Out_ptr, DownScales_ptr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, WEIGHT_FORMAT: tl.constexpr, QBLOCK: tl.constexpr,
):  # fmt: skip
    """out[row, n] = weights[pair] * (h[row] . down[e, n]), pair = SortedPairs[row].

    grid = (cdiv(T*K, BLOCK_M) + E, cdiv(H, BLOCK_N))
    """
    pid_m = tl.program_id(0)
    if pid_m < tl.load(TileOffsets_ptr + num_experts):
        e, rows, r_ok = _tile_rows(pid_m, ExpertOffsets_ptr, TileOffsets_ptr, num_experts, BLOCK_M, BLOCK_E)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < hidden
        a_ptr = H_ptr + rows[:, None].to(tl.int64) * h_stride
        w_ptr = Down_ptr + e.to(tl.int64) * dn_stride_e + n[:, None].to(tl.int64) * dn_stride_n
        s_ptr = DownScales_ptr  # None for float weights
        if WEIGHT_FORMAT != "float":
            s_ptr = DownScales_ptr + (e.to(tl.int64) * hidden + n[:, None]) * ((inter + QBLOCK - 1) // QBLOCK)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < inter
            a = tl.load(a_ptr + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            w = _weight_tile(
                w_ptr, s_ptr, k0, inter, n_ok, WEIGHT_FORMAT, QBLOCK, BLOCK_K, H_ptr.dtype.element_ty
            )
            acc = tl.dot(a, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        pair = tl.load(SortedPairs_ptr + rows, mask=r_ok, other=0)
        acc = acc * tl.load(Weights_ptr + pair, mask=r_ok, other=0.0)[:, None]
        tl.store(Out_ptr + rows[:, None].to(tl.int64) * out_stride + n[None, :], acc.to(Out_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & n_ok[None, :])  # fmt: skip


# ----- 7. combine ---------------------------------------------------------------------------------------


@triton.jit
def _moe_combine_kernel(
    Out_ptr, PairRows_ptr, out_stride, y_stride, hidden, Y_ptr, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr
):
    """y[t, n] = sum_k out[PairRows[t*K + k], n], summed in fp32.   grid = (T, cdiv(H, BLOCK_H))"""
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    n_ok = n < hidden
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        row = tl.load(PairRows_ptr + t * TOP_K + k).to(tl.int64)
        acc += tl.load(Out_ptr + row * out_stride + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(Y_ptr + t * y_stride + n, acc.to(Y_ptr.dtype.element_ty), mask=n_ok)


# ----- torch-facing wrappers -----------------------------------------------------------------------------


def input_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def route(router_logits: Tensor, per_expert_scale: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """`ops.route` on the GPU: weights [T, K] fp32 and expert ids [T, K] int32."""
    T, E = router_logits.shape
    if not 1 <= top_k <= E:
        raise Gemma4CompileError(f"moe kernel: top_k {top_k} must be in 1..{E}")
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    weights = torch.empty(T, top_k, device=logits.device, dtype=torch.float32)
    ids = torch.empty(T, top_k, device=logits.device, dtype=torch.int32)
    block_t = 16
    _moe_route_kernel[(triton.cdiv(T, block_t),)](
        logits, per_expert_scale.contiguous(), logits.stride(0), T, E, weights, ids,
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), BLOCK_T=block_t, BLOCK_E=triton.next_power_of_2(E),
    )  # fmt: skip
    return weights, ids


def sort_by_expert(ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Counting sort of the T*K (token, slot) pairs by expert.

    Returns SortedPairs [T*K] (pair index per sorted row), PairRows [T*K] (its inverse), ExpertOffsets [E+1]
    and TileOffsets [E+1] (exclusive prefix sums of rows and of BLOCK_M row tiles per expert).
    """
    n = ids.numel()
    dev = ids.device
    block_e = triton.next_power_of_2(num_experts)
    n_blocks = triton.cdiv(n, BLOCK_P)
    counts = torch.empty(n_blocks, block_e, device=dev, dtype=torch.int32)
    block_offsets = torch.empty_like(counts)
    expert_offsets = torch.empty(num_experts + 1, device=dev, dtype=torch.int32)
    tile_offsets = torch.empty_like(expert_offsets)
    sorted_pairs = torch.empty(n, device=dev, dtype=torch.int32)
    pair_rows = torch.empty_like(sorted_pairs)
    flat = ids.reshape(-1).contiguous()
    _moe_count_kernel[(n_blocks,)](flat, n, counts, BLOCK_P=BLOCK_P, BLOCK_E=block_e)
    _moe_offsets_kernel[(1,)](
        counts, n_blocks, num_experts, block_offsets, expert_offsets, tile_offsets,
        BLOCK_M=block_m, BLOCK_B=16, BLOCK_E=block_e,
    )  # fmt: skip
    _moe_scatter_kernel[(n_blocks,)](
        flat, block_offsets, expert_offsets, n, sorted_pairs, pair_rows, BLOCK_P=BLOCK_P, BLOCK_E=block_e
    )
    return sorted_pairs, pair_rows, expert_offsets, tile_offsets


MOE_STAGES = STAGE_KERNELS  # the @triton.jit functions below, by name


def aot_configs(
    experts: int, top_k: int, dtype: str, max_shared_bytes: int, rows_per_expert: float
) -> dict[str, tuple[dict[str, Any], int, int]]:
    """(constexprs, num_warps, num_stages) of each of the seven launches (plugins/aot.py kernel names, in
    launch order) that make one MoE call, for a dtype ("bf16", "fp16", "fp32") and a target's shared memory.
    rows_per_expert ~ T*K / min(E, T*K) picks the GEMM tile (decode ~1, prefill hundreds); the sort kernels
    are dtype-free (compile them with dtype "i32")."""
    block_e = triton.next_power_of_2(experts)
    conf = gemm_tile(rows_per_expert, max_shared_bytes)
    # float experts: the stage plugins' weights arrive dequantized (DequantizeLinear before the op)
    tile = {**conf.kwargs, "BLOCK_E": block_e, "INPUT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
            "WEIGHT_FORMAT": "float", "QBLOCK": 0}  # fmt: skip
    gemm = (conf.num_warps, conf.num_stages)
    return {
        "moe_route": ({"TOP_K": top_k, "K_PAD": triton.next_power_of_2(top_k), "BLOCK_T": 16, "BLOCK_E": block_e}, 4, 1),
        "moe_count": ({"BLOCK_P": BLOCK_P, "BLOCK_E": block_e}, 4, 1),
        "moe_offsets": ({"BLOCK_M": conf.kwargs["BLOCK_M"], "BLOCK_B": 16, "BLOCK_E": block_e}, 4, 1),
        "moe_scatter": ({"BLOCK_P": BLOCK_P, "BLOCK_E": block_e}, 4, 1),
        "moe_gate_up": ({**tile, "TOP_K": top_k, "GateUpScales_ptr": None}, *gemm),
        "moe_down": ({**tile, "DownScales_ptr": None}, *gemm),
        "moe_combine": ({"TOP_K": top_k, "BLOCK_H": 1024}, 4, 1),
    }  # fmt: skip


# The buffers the seven launches pass between them, by kernel argument name: shape from the MoE dims (ints or
# TensorRT shape expressions: T tokens, K top_k, N = T*K routed pairs, NB = cdiv(N, BLOCK_P) sort blocks,
# BE = next_pow2(E), E experts, H hidden, I expert width) and element kind ("f32", "i32", or "act" = x's dtype).
# Weights/Ids come out of routing; BlockCounts/BlockOffsets/ExpertOffsets/TileOffsets/SortedPairs/PairRows out of
# the sort; H (the GLU activations) and Out (weighted expert rows, sorted order) out of the GEMMs; Y is the result.
# Sizes grow with T*K, never with E beyond the E+1 offsets.
BUFFERS: dict[str, tuple[Callable[[Mapping[str, Any]], tuple[Any, ...]], str]] = {
    "Weights_ptr": (lambda d: (d["T"], d["K"]), "f32"),
    "Ids_ptr": (lambda d: (d["T"], d["K"]), "i32"),
    "BlockCounts_ptr": (lambda d: (d["NB"], d["BE"]), "i32"),
    "BlockOffsets_ptr": (lambda d: (d["NB"], d["BE"]), "i32"),
    "ExpertOffsets_ptr": (lambda d: (d["E"] + 1,), "i32"),
    "TileOffsets_ptr": (lambda d: (d["E"] + 1,), "i32"),
    "SortedPairs_ptr": (lambda d: (d["N"],), "i32"),
    "PairRows_ptr": (lambda d: (d["N"],), "i32"),
    "H_ptr": (lambda d: (d["N"], d["I"]), "act"),
    "Out_ptr": (lambda d: (d["N"], d["H"]), "act"),
    "Y_ptr": (lambda d: (d["T"], d["H"]), "act"),
}


def complete_dims(known: Mapping[str, Any], top_k: int, experts: int) -> dict[str, Any]:
    """`known` dims plus K, E, BE and whichever of N = T*K, T = N // K and NB = cdiv(N, BLOCK_P) they imply;
    + * // only, so the dims may be shape expressions."""
    dims = {**known, "K": top_k, "E": experts, "BE": triton.next_power_of_2(experts)}
    if "T" in dims:
        dims.setdefault("N", dims["T"] * top_k)
    if "N" in dims:
        dims.setdefault("T", dims["N"] // top_k)
        dims.setdefault("NB", cdiv(dims["N"], BLOCK_P))
    return dims


def launch_dims(tokens: Any, hidden: Any, experts: int, inter: Any, top_k: int) -> dict[str, Any]:
    """Every MoE dim the launches and BUFFERS use, from the op's own (T, H, E, I, K)."""
    return complete_dims({"T": tokens, "H": hidden, "I": inter}, top_k, experts)


def workspace(
    tokens: int, hidden: int, experts: int, inter: int, top_k: int, dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every buffer of BUFFERS as (shape, torch dtype) for one call."""
    dims = launch_dims(tokens, hidden, experts, inter, top_k)
    kinds = {"f32": torch.float32, "i32": torch.int32, "act": dtype}
    return {name: (shape(dims), kinds[kind]) for name, (shape, kind) in BUFFERS.items()}


def _gemm_config(rows_per_expert: float, hidden: int, inter: int, weight_format: str) -> triton.Config:
    if _interpreting() or not torch.cuda.is_available():
        return triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
    target = local_target()
    smem = target.max_shared_bytes if target else 99 * 1024
    return gemm_tile(rows_per_expert, smem, min(hidden, inter), weight_format)


WEIGHT_FORMATS = ("int4", "fp8")  # quantized expert formats the GEMM kernels decode (QuantizedExperts)
_CODES_DTYPE = {"int4": torch.uint8, "fp8": torch.float8_e4m3fn}
_CODES_PER_ITEM = {"int4": 2, "fp8": 1}


@dataclass(frozen=True)
class QuantizedExperts:
    """Expert weights [E, N, K] as a quantized export stores them (quant/formats.py role `moe_experts`, the
    DequantizeLinear form): codes blocked along K, padded with zero codes to whole blocks, one scale per block.

    codes: int4 -> uint8 [E, N, Kp / 2], two two's complement nibbles per byte, the lower k in the low nibble;
    fp8 -> float8_e4m3fn [E, N, Kp] (Kp = cdiv(K, block) * block). scales: [E, N, Kp / block], fp32 or the
    activations' dtype (an export stores them in its dtype). K itself comes from the other GEMM operand.
    """

    codes: Tensor
    scales: Tensor
    format: str  # "int4" | "fp8"
    block: int  # 32, 64 or 128 along K

    @classmethod
    def encode(
        cls, w: Tensor, fmt: str, block: int, scale_dtype: torch.dtype = torch.float32
    ) -> QuantizedExperts:
        """The export's codes and scales of float experts w [E, N, K] (quant/encode.py, DequantizeLinear form),
        scales stored in `scale_dtype` as the export's dtype stores them."""
        from ...quant.encode import encode_rows
        from ...quant.formats import GRAPH_DQ

        E, N, K = w.shape
        data, scales = encode_rows(fmt, w.detach().float().cpu().reshape(E * N, K).numpy(), block, GRAPH_DQ)
        codes = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(_CODES_DTYPE[fmt]).reshape(E, N, -1)
        return cls(
            codes.to(w.device),
            torch.from_numpy(scales).reshape(E, N, -1).to(w.device, scale_dtype),
            fmt,
            block,
        )

    @property
    def experts_rows(self) -> tuple[int, int]:
        """(E, N): the leading dims of the weight."""
        return int(self.codes.shape[0]), int(self.codes.shape[1])

    def check(self, name: str, shape: tuple[int, int, int]) -> None:
        """One-line Gemma4CompileError unless this holds weight `name` of float shape [E, N, K]."""
        from ...quant.formats import BLOCK_SIZES

        if self.format not in WEIGHT_FORMATS:
            raise Gemma4CompileError(
                f"moe kernel: {name} format {self.format!r} is not one of {', '.join(WEIGHT_FORMATS)}"
            )
        if self.block not in BLOCK_SIZES:
            raise Gemma4CompileError(f"moe kernel: {name} block {self.block} is not one of {BLOCK_SIZES}")
        want_dtype = _CODES_DTYPE[self.format]
        if self.codes.dtype != want_dtype or self.codes.dim() != 3:
            raise Gemma4CompileError(
                f"moe kernel: {name} {self.format} codes are {self.codes.dtype} {tuple(self.codes.shape)}, "
                f"want {want_dtype} [E, N, K']"
            )
        E, N, K = shape
        width = int(self.codes.shape[2]) * _CODES_PER_ITEM[self.format]
        if width % self.block:
            raise Gemma4CompileError(
                f"moe kernel: {name} block {self.block} does not divide its codes' K {width}"
            )
        padded = cdiv(K, self.block) * self.block
        if (*self.experts_rows, width) != (E, N, padded):
            raise Gemma4CompileError(
                f"moe kernel: {name} {self.format} codes hold {[*self.experts_rows, width]} values, "
                f"want {[E, N, padded]} (K {K} in blocks of {self.block})"
            )
        if tuple(self.scales.shape) != (E, N, padded // self.block) or not self.scales.is_floating_point():
            raise Gemma4CompileError(
                f"moe kernel: {name} scales are {self.scales.dtype} {tuple(self.scales.shape)}, "
                f"want float {(E, N, padded // self.block)}"
            )


Experts = Tensor | QuantizedExperts


def _weight_operand(
    w: Experts, name: str, shape: tuple[int, int, int], dtype: torch.dtype
) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """(weight or codes, scales or None, the kernel's WEIGHT_FORMAT / QBLOCK) of a GEMM's expert operand."""
    if isinstance(w, QuantizedExperts):
        w.check(name, shape)
        codes = w.codes if w.codes.stride(-1) == 1 else w.codes.contiguous()
        return codes, w.scales.contiguous(), {"WEIGHT_FORMAT": w.format, "QBLOCK": w.block}
    if tuple(w.shape) != shape:
        raise Gemma4CompileError(f"moe kernel: {name} is {tuple(w.shape)}, want {shape}")
    if w.dtype != dtype:
        raise Gemma4CompileError(f"moe kernel: {name} is {w.dtype}, activations {dtype}")
    return (w if w.stride(-1) == 1 else w.contiguous()), None, {"WEIGHT_FORMAT": "float", "QBLOCK": 0}


def _leading(w: Experts) -> tuple[int, int]:
    return w.experts_rows if isinstance(w, QuantizedExperts) else (int(w.shape[0]), int(w.shape[1]))


def _check(
    x: Tensor, router_logits: Tensor, per_expert_scale: Tensor, gate_up: Experts, down: Experts
) -> None:
    T, H = x.shape
    E, two_i = _leading(gate_up)
    if router_logits.shape != (T, E) or per_expert_scale.shape != (E,) or two_i % 2:
        raise Gemma4CompileError(
            f"moe kernel: inconsistent shapes x {tuple(x.shape)}, router_logits {tuple(router_logits.shape)}, "
            f"per_expert_scale {tuple(per_expert_scale.shape)}, gate_up [{E}, {two_i}, ...]"
        )
    _weight_operand(gate_up, "gate_up", (E, two_i, H), x.dtype)
    _weight_operand(down, "down", (E, H, two_i // 2), x.dtype)
    if E > 1024:
        raise Gemma4CompileError(f"moe kernel: {E} experts; at most 1024 are supported")


def _gemm_launch(
    conf: triton.Config, rows: int, experts: int, width: int
) -> tuple[tuple[int, int], dict[str, Any]]:
    """Grid and launch options of a grouped GEMM: cdiv(T*K, BM) + min(E, T*K) row tiles (one partial tile per
    hit expert at most) by cdiv(width, BN) output tiles."""
    bm, bn = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"]
    tiles = triton.cdiv(rows, bm) + min(experts, rows)
    return (tiles, triton.cdiv(width, bn)), {
        **conf.kwargs,
        "num_warps": conf.num_warps,
        "num_stages": conf.num_stages,
    }


def grouped_gate_up(
    x: Tensor, gate_up: Experts, sorted_pairs: Tensor, expert_offsets: Tensor, tile_offsets: Tensor,
    top_k: int, config: triton.Config,
) -> Tensor:  # fmt: skip
    """Stage 5: h [T*K, I] in the sorted row order, from float or quantized gate_up [E, 2I, H]."""
    E, two_i = _leading(gate_up)
    T, H = x.shape
    inter = two_i // 2
    w, scales, fmt = _weight_operand(gate_up, "gate_up", (E, two_i, H), x.dtype)
    x = x if x.stride(-1) == 1 else x.contiguous()
    h = torch.empty(T * top_k, inter, device=x.device, dtype=x.dtype)
    grid, launch = _gemm_launch(config, T * top_k, E, inter)
    _moe_gate_up_kernel[grid](
        x, w, sorted_pairs, expert_offsets, tile_offsets,
        x.stride(0), w.stride(0), w.stride(1), h.stride(0), H, inter, E, h, scales,
        TOP_K=top_k, BLOCK_E=triton.next_power_of_2(E), INPUT_PRECISION=input_precision(x.dtype), **fmt, **launch,
    )  # fmt: skip
    return h


def grouped_down(
    h: Tensor, down: Experts, sorted_pairs: Tensor, weights: Tensor, expert_offsets: Tensor,
    tile_offsets: Tensor, config: triton.Config,
) -> Tensor:  # fmt: skip
    """Stage 6: the weighted expert rows [T*K, H] in the sorted row order, from float or quantized down [E, H, I]."""
    E, H = _leading(down)
    n, inter = h.shape
    w, scales, fmt = _weight_operand(down, "down", (E, H, inter), h.dtype)
    rows = torch.empty(n, H, device=h.device, dtype=h.dtype)
    grid, launch = _gemm_launch(config, n, E, H)
    _moe_down_kernel[grid](
        h, w, sorted_pairs, weights, expert_offsets, tile_offsets,
        h.stride(0), w.stride(0), w.stride(1), rows.stride(0), H, inter, E, rows, scales,
        BLOCK_E=triton.next_power_of_2(E), INPUT_PRECISION=input_precision(h.dtype), **fmt, **launch,
    )  # fmt: skip
    return rows


def combine(rows: Tensor, pair_rows: Tensor, top_k: int) -> Tensor:
    """Stage 7: y [T, H] = the sum of each token's K weighted expert rows, in fp32."""
    n, H = rows.shape
    y = torch.empty(n // top_k, H, device=rows.device, dtype=rows.dtype)
    block_h = min(1024, triton.next_power_of_2(H))
    _moe_combine_kernel[(n // top_k, triton.cdiv(H, block_h))](
        rows, pair_rows, rows.stride(0), y.stride(0), H, y, TOP_K=top_k, BLOCK_H=block_h, num_warps=4
    )
    return y


def moe(
    x: Tensor, router_logits: Tensor, per_expert_scale: Tensor, gate_up: Experts, down: Experts, top_k: int,
    *, config: triton.Config | None = None,
) -> Tensor:  # fmt: skip
    """`gemma4::moe` (same signature and results as `ops.moe_reference`) on Triton kernels; gate_up and down may
    be QuantizedExperts (then the results are the reference's on the dequantized weights)."""
    _check(x, router_logits, per_expert_scale, gate_up, down)
    T, H = x.shape
    E, two_i = _leading(gate_up)
    if T == 0:
        return torch.empty_like(x)
    weights, ids = route(router_logits, per_expert_scale, top_k)
    n = T * top_k
    fmt = gate_up.format if isinstance(gate_up, QuantizedExperts) else "float"
    conf = config or _gemm_config(n / min(E, n), H, two_i // 2, fmt)
    sorted_pairs, pair_rows, expert_offsets, tile_offsets = sort_by_expert(ids, E, conf.kwargs["BLOCK_M"])
    h = grouped_gate_up(x, gate_up, sorted_pairs, expert_offsets, tile_offsets, top_k, conf)
    rows = grouped_down(h, down, sorted_pairs, weights, expert_offsets, tile_offsets, conf)
    return combine(rows, pair_rows, top_k)
