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

The grouped GEMMs launch cdiv(T*K, BLOCK_M) + E row-tile programs, an upper bound of the true tile count that
needs no device-to-host sync; programs past TileOffsets[E] exit at once. Kernel arguments are ordered inputs,
int32 scalars, outputs (TensorRT QDP `aot_impl` order); each kernel is one launch, so each stage can be a plugin.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...errors import Gemma4CompileError
from ...ops.moe import STAGE_KERNELS
from ...targets import native_target
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
# work list is cut in BLOCK_M row tiles). Decode-like batches route ~1 row to each expert: 16-row tiles, deep
# pipeline, bandwidth-bound on the weights. Prefill routes hundreds: 64-row tiles. ptxas reports (bf16): no
# spills for any of these on sm80..sm120; shared memory per stage is (BM + 2 BN) BK 2 B for gate_up.


def gemm_configs(rows_per_expert: float, max_shared_bytes: int = 99 * 1024) -> list[triton.Config]:
    """Tile candidates for `_moe_gate_up_kernel` / `_moe_down_kernel`, best first, for a target's shared memory."""
    if rows_per_expert <= 16:
        shapes = [(16, 64, 64, 4, 4)]
    elif max_shared_bytes >= 160 * 1024:
        shapes = [(64, 128, 64, 8, 3), (64, 64, 64, 4, 3)]
    else:
        shapes = [(64, 64, 64, 4, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
            for m, n, k, w, st in shapes]  # fmt: skip


def keep_gemm(conf: triton.Config, out_features: int, reduction: int) -> bool:
    """Drop tiles wider than the problem (the tiny test models have H = 64)."""
    n, k = conf.kwargs["BLOCK_N"], conf.kwargs["BLOCK_K"]
    return n <= max(16, triton.next_power_of_2(out_features)) and k <= max(
        16, triton.next_power_of_2(reduction)
    )


def gemm_tile(rows_per_expert: float, max_shared_bytes: int, width: int | None = None) -> triton.Config:
    """The one GEMM tile choice of the torch wrapper, `gemma4-compile kernels` and the stage plugins: the first
    candidate for the routed rows and the target's shared memory, no wider than the problem when its width
    (min(H, I)) is known; AOT variants are compiled before the width is, and Gemma 4's never prunes a tile."""
    confs = gemm_configs(rows_per_expert, max_shared_bytes)
    if width is None:
        return confs[0]
    return next((c for c in confs if keep_gemm(c, width, width)), confs[-1])


@triton.jit
def _moe_gate_up_kernel(
    X_ptr, GateUp_ptr, SortedPairs_ptr, ExpertOffsets_ptr, TileOffsets_ptr,
    x_stride_t, gu_stride_e, gu_stride_n, h_stride, hidden, inter, num_experts,
    H_ptr,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr, INPUT_PRECISION: tl.constexpr,
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
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < hidden
            a = tl.load(a_ptr + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            wg = tl.load(w_ptr + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            wu = tl.load(
                w_ptr + inter * gu_stride_n + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0
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
    Out_ptr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
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
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < inter
            a = tl.load(a_ptr + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
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
    tile = {**conf.kwargs, "BLOCK_E": block_e, "INPUT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    gemm = (conf.num_warps, conf.num_stages)
    return {
        "moe_route": ({"TOP_K": top_k, "K_PAD": triton.next_power_of_2(top_k), "BLOCK_T": 16, "BLOCK_E": block_e}, 4, 1),
        "moe_count": ({"BLOCK_P": BLOCK_P, "BLOCK_E": block_e}, 4, 1),
        "moe_offsets": ({"BLOCK_M": conf.kwargs["BLOCK_M"], "BLOCK_B": 16, "BLOCK_E": block_e}, 4, 1),
        "moe_scatter": ({"BLOCK_P": BLOCK_P, "BLOCK_E": block_e}, 4, 1),
        "moe_gate_up": ({**tile, "TOP_K": top_k}, *gemm),
        "moe_down": (tile, *gemm),
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


def _gemm_config(rows_per_expert: float, hidden: int, inter: int) -> triton.Config:
    if _interpreting() or not torch.cuda.is_available():
        return triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
    try:
        smem = native_target().max_shared_bytes
    except Gemma4CompileError:
        smem = 99 * 1024
    return gemm_tile(rows_per_expert, smem, min(hidden, inter))


def _check(x: Tensor, router_logits: Tensor, per_expert_scale: Tensor, gate_up: Tensor, down: Tensor) -> None:
    T, H = x.shape
    E, two_i, H2 = gate_up.shape
    if router_logits.shape != (T, E) or per_expert_scale.shape != (E,) or H2 != H or two_i % 2:
        raise Gemma4CompileError(
            f"moe kernel: inconsistent shapes x {tuple(x.shape)}, router_logits {tuple(router_logits.shape)}, "
            f"per_expert_scale {tuple(per_expert_scale.shape)}, gate_up {tuple(gate_up.shape)}"
        )
    if tuple(down.shape) != (E, H, two_i // 2):
        raise Gemma4CompileError(f"moe kernel: down is {tuple(down.shape)}, want {(E, H, two_i // 2)}")
    if gate_up.dtype != x.dtype or down.dtype != x.dtype:
        raise Gemma4CompileError(
            f"moe kernel: weights are {gate_up.dtype}/{down.dtype}, activations {x.dtype}"
        )
    if E > 1024:
        raise Gemma4CompileError(f"moe kernel: {E} experts; at most 1024 are supported")


def moe(
    x: Tensor, router_logits: Tensor, per_expert_scale: Tensor, gate_up: Tensor, down: Tensor, top_k: int,
    *, config: triton.Config | None = None,
) -> Tensor:  # fmt: skip
    """`gemma4::moe` (same signature and results as `ops.moe_reference`) on Triton kernels."""
    _check(x, router_logits, per_expert_scale, gate_up, down)
    T, H = x.shape
    E, inter = gate_up.shape[0], down.shape[2]
    y = torch.empty_like(x)
    if T == 0:
        return y
    x, gate_up, down = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, gate_up, down))
    weights, ids = route(router_logits, per_expert_scale, top_k)
    n = T * top_k
    conf = config or _gemm_config(n / min(E, n), H, inter)
    bm, bn, bk = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"], conf.kwargs["BLOCK_K"]
    sorted_pairs, pair_rows, expert_offsets, tile_offsets = sort_by_expert(ids, E, bm)
    prec = input_precision(x.dtype)
    block_e = triton.next_power_of_2(E)
    launch = {"num_warps": conf.num_warps, "num_stages": conf.num_stages}
    tiles = triton.cdiv(n, bm) + min(E, n)  # bound on sum_e cdiv(rows_e, BM): one partial tile per hit expert
    ws = workspace(T, H, E, inter, top_k, x.dtype)
    h = torch.empty(ws["H_ptr"][0], device=x.device, dtype=x.dtype)
    _moe_gate_up_kernel[(tiles, triton.cdiv(inter, bn))](
        x, gate_up, sorted_pairs, expert_offsets, tile_offsets,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), h.stride(0), H, inter, E, h,
        TOP_K=top_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=block_e, INPUT_PRECISION=prec, **launch,
    )  # fmt: skip
    rows = torch.empty(ws["Out_ptr"][0], device=x.device, dtype=x.dtype)
    _moe_down_kernel[(tiles, triton.cdiv(H, bn))](
        h, down, sorted_pairs, weights, expert_offsets, tile_offsets,
        h.stride(0), down.stride(0), down.stride(1), rows.stride(0), H, inter, E, rows,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=block_e, INPUT_PRECISION=prec, **launch,
    )  # fmt: skip
    block_h = min(1024, triton.next_power_of_2(H))
    _moe_combine_kernel[(T, triton.cdiv(H, block_h))](
        rows, pair_rows, rows.stride(0), y.stride(0), H, y, TOP_K=top_k, BLOCK_H=block_h, num_warps=4
    )
    return y
