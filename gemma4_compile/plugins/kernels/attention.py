"""Triton kernels for `gemma4::attention`: ring-buffer KV cache, sliding window or global, GQA, head_dim up to 512.

The math is `ops.attention_reference`. Keys are the C cached ring slots followed by the S new tokens, each tagged
with its absolute position: slot j of a ring that has seen L tokens holds position L-1 - ((L-1-j) mod C) (negative:
empty), new token s sits at past_len + s and is valid when s < seq_len. A query at position i sees key position j
when the key is valid, j <= i and (window W > 0) j > i - W. Then

    out_i = sum_j softmax_j(scale * q_i . k_j) v_j          (softmax in fp32, masked keys excluded)

Valid cached positions are exactly [max(0, past_len - C), past_len) and valid new ones [past_len, past_len +
seq_len), so the keys a query sees form ONE contiguous position range

    vis(i) = [max(lo, i - W + 1), min(hi, i)],   lo = max(0, past_len - C),  hi = past_len + seq_len - 1.

The kernels therefore loop over key *positions*, not over storage: position p < past_len is read from ring slot
p mod C, p >= past_len from the new tokens at p - past_len. A query block only visits the positions its rows can
see, so a sliding layer touches W + BLOCK keys per block whatever the cache or prompt length (the tiles wholly
outside [i - W + 1, i] are never loaded).

Image blocks (`block_ids` [B, S], 26B/31B prompts with images; HAS_BLOCKS): on a sliding layer a new query
also sees the new keys of its own block (id >= 0), later ones included, still inside the window; cached slots
have no block. Those later keys lie past every row's causal range, so the kernel visits them in a second loop
over the new tokens after the block's causal range, skipping each tile that holds no key of a row's block
before loading its K/V. HAS_BLOCKS=False compiles none of this: the causal kernel is unchanged.

A row that sees no key at all (only right padding W or more tokens past the last valid one, or a row with
nothing valid) gets what the reference gives it: every score is then the same finite fp32 minimum, so softmax is
uniform over all C + S keys and the output is their plain mean. The kernels reproduce that by giving such rows a
score of 0 for every key in range and widening the block's key range to all C + S keys.

Kernels (signature order is inputs, int32 scalars, outputs, constexprs: the layout TensorRT's QDP `aot_impl`
launches with; strides are element strides of [B, H, L, D] tensors whose last dim is contiguous):

* `_attn_fwd_kernel`    flash attention over key tiles with online softmax and fp32 accumulators. Rows pack the
                        `group` query heads that share one KV head with BLOCK_M // group positions, so K/V tiles
                        are loaded once per KV head. With FUSE_RING the same launch also writes the presents
                        (extra programs past the query blocks), so prefill and decode are one kernel launch.
* `_attn_decode_split_kernel` + `_attn_decode_combine_kernel`   flash-decoding for S == 1: the visible position
                        range is split over `num_splits` programs per KV head, each writes an unnormalized partial
                        (acc, max, sum); the combine kernel merges them with the log-sum-exp rule.
* `_ring_update_kernel` present = ring after writing the valid new tokens (the last C win); COPY_PAST=True
                        writes a fresh ring, False writes only the new tokens into an aliased (in-place) ring.

Online softmax (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022), in base 2:
    s = log2(e) * scale * q.k;  m' = max(m, max_j s_j);  l' = l 2^(m - m') + sum_j 2^(s_j - m');
    acc' = acc 2^(m - m') + sum_j 2^(s_j - m') v_j;  out = acc / l.
Split-K merge (flash-decoding, Dao et al. 2023): M = max_s m_s; out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s.
"""

from __future__ import annotations

import math
import os
from typing import Any, cast

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...errors import Gemma4CompileError
from ...targets import GpuTarget, local_target

LOG2E = tl.constexpr(1.4426950408889634)  # softmax runs in base 2: exp(x) = 2^(x log2 e)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256, 512)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----- shared device helpers -----------------------------------------------------------------------


@triton.jit
def _ring_slot(pos, slots):
    """Ring slot of absolute position pos (pos may be negative for empty slots): pos mod C in [0, C)."""
    return ((pos % slots) + slots) % slots


@triton.jit
def _attend_span(
    acc, m_i, l_i, q, q_pos, q_blk, row_empty, K_ptr, k_stride_s, V_ptr, v_stride_s, Blk_ptr,
    past_len, lo, hi, slots, window, p_start, p_end, qk_scale,
    IS_RING: tl.constexpr, HAS_BLOCKS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax over key positions [p_start, p_end), all stored in one place: ring slot p mod C
    (IS_RING) or new token p - past_len. One storage per loop keeps each load one base + offsets, which
    Triton's software pipeliner needs (a pointer picked per row with tl.where is never prefetched).
    HAS_BLOCKS (new tokens, not IS_RING): a key of the row's own block q_blk (>= 0) is visible after the row
    too."""
    offs_d = tl.arange(0, HEAD_DIM)
    for p0 in range(p_start, p_end, BLOCK_N):
        pos = p0 + tl.arange(0, BLOCK_N)
        in_range = pos < p_end
        if IS_RING:
            row = _ring_slot(pos, slots).to(tl.int64)
        else:
            row = (pos - past_len).to(tl.int64)
        k = tl.load(K_ptr + row[:, None] * k_stride_s + offs_d[None, :], mask=in_range[:, None], other=0.0)
        v = tl.load(V_ptr + row[:, None] * v_stride_s + offs_d[None, :], mask=in_range[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        key_ok = in_range & (pos >= lo) & (pos <= hi)
        seen = pos[None, :] <= q_pos[:, None]
        if HAS_BLOCKS:  # new tokens only (the ring span is always called without)
            seen = seen | _same_block(q_blk, Blk_ptr, pos - past_len, in_range)
        visible = key_ok[None, :] & seen
        visible = visible & ((window == 0) | (pos[None, :] > q_pos[:, None] - window))
        s = tl.where(visible, qk, float("-inf"))
        # Rows that see nothing score every in-range key 0: uniform softmax, as the reference's all-min scores.
        s = tl.where(row_empty[:, None], tl.where(in_range[None, :], 0.0, float("-inf")), s)
        acc, m_i, l_i = _online_softmax(acc, m_i, l_i, s, v, INPUT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _online_softmax(acc, m_i, l_i, s, v, INPUT_PRECISION: tl.constexpr):
    """Fold one tile of base-2 scores s (-inf: masked) and its values v into (acc, m, l)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key in this tile yet: no NaN
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _same_block(q_blk, Blk_ptr, token, in_range):
    """[rows, keys]: new token `token` belongs to the row's image block (ids >= 0; -1 = no block)."""
    k_blk = tl.load(Blk_ptr + token, mask=in_range, other=-1).to(tl.int32)  # int32: fewer registers
    return (q_blk[:, None] == k_blk[None, :]) & (q_blk[:, None] >= 0)


@triton.jit
def _attend_block_tail(
    acc, m_i, l_i, q, q_blk, K_ptr, k_stride_s, V_ptr, v_stride_s, Blk_ptr,
    past_len, p_start, p_end, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """New keys [p_start, p_end) after every row's causal range: each is visible only to the rows of its image
    block (it lies after them, so inside their window). A tile with no such key is skipped before its K/V
    loads, so a block costs its own length, not the rest of the prompt."""
    offs_d = tl.arange(0, HEAD_DIM)
    for p0 in tl.range(p_start, p_end, BLOCK_N, num_stages=1):  # rarely taken: no pipeline buffers
        pos = p0 + tl.arange(0, BLOCK_N)
        in_range = pos < p_end
        visible = _same_block(q_blk, Blk_ptr, pos - past_len, in_range) & in_range[None, :]
        if tl.max(tl.max(visible.to(tl.int32), 1), 0) > 0:
            row = (pos - past_len).to(tl.int64)
            k = tl.load(
                K_ptr + row[:, None] * k_stride_s + offs_d[None, :], mask=in_range[:, None], other=0.0
            )
            v = tl.load(
                V_ptr + row[:, None] * v_stride_s + offs_d[None, :], mask=in_range[:, None], other=0.0
            )
            qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
            s = tl.where(visible, qk, float("-inf"))
            acc, m_i, l_i = _online_softmax(acc, m_i, l_i, s, v, INPUT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _attend(
    acc, m_i, l_i, q, q_pos, q_blk, row_empty,
    K_ptr, k_stride_s, V_ptr, v_stride_s, PK_ptr, pk_stride_s, PV_ptr, pv_stride_s, Blk_ptr,
    past_len, lo, hi, slots, window, p_start, p_end, qk_scale,
    HAS_BLOCKS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Key positions [p_start, p_end): the cached ones (< past_len) from the ring, then the new tokens."""
    acc, m_i, l_i = _attend_span(
        acc, m_i, l_i, q, q_pos, q_blk, row_empty, PK_ptr, pk_stride_s, PV_ptr, pv_stride_s, Blk_ptr,
        past_len, lo, hi, slots, window, p_start, tl.minimum(p_end, past_len), qk_scale,
        True, False, HEAD_DIM, BLOCK_N, INPUT_PRECISION,
    )  # fmt: skip
    acc, m_i, l_i = _attend_span(
        acc, m_i, l_i, q, q_pos, q_blk, row_empty, K_ptr, k_stride_s, V_ptr, v_stride_s, Blk_ptr,
        past_len, lo, hi, slots, window, tl.maximum(p_start, past_len), p_end, qk_scale,
        False, HAS_BLOCKS, HEAD_DIM, BLOCK_N, INPUT_PRECISION,
    )  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def _visible_bounds(q_pos, past_len, seq_len, slots, window):
    """Per-row visible key positions [vis_lo, vis_hi] plus the valid range [lo, hi] of the whole key set."""
    lo = tl.maximum(past_len - slots, 0)
    hi = past_len + seq_len - 1
    vis_lo = tl.where(window > 0, tl.maximum(lo, q_pos - window + 1), lo)
    vis_hi = tl.minimum(hi, q_pos)
    return lo, hi, vis_lo, vis_hi


@triton.jit
def _ring_rows(
    New_ptr, new_stride_s, Past_ptr, past_stride_s, Out_ptr, out_stride_s,
    j0, past_len, seq_len, slots, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """present[j] for slots j0..j0+BLOCK_R: slot j afterwards holds position P = L-1 - ((L-1-j) mod C),
    L = past_len + seq_len; it comes from new token P - past_len when P >= past_len, else stays past[j]."""
    offs_d = tl.arange(0, HEAD_DIM)
    j = j0 + tl.arange(0, BLOCK_R)
    ok = j < slots
    last = past_len + seq_len - 1
    pos = last - _ring_slot(last - j, slots)
    take_new = pos >= past_len
    src = pos - past_len
    old = tl.load(
        Past_ptr + j[:, None].to(tl.int64) * past_stride_s + offs_d[None, :], mask=(ok & ~take_new)[:, None]
    )
    new = tl.load(
        New_ptr + src[:, None].to(tl.int64) * new_stride_s + offs_d[None, :], mask=(ok & take_new)[:, None]
    )
    val = tl.where(take_new[:, None], new, old)
    tl.store(Out_ptr + j[:, None].to(tl.int64) * out_stride_s + offs_d[None, :], val, mask=ok[:, None])


# ----- prefill / single-launch attention ---------------------------------------------------------------
# Tiles (BLOCK_M packed query rows x BLOCK_N keys, warps, stages), picked from ptxas reports for every target
# (`plugins/aot.py`, bf16): the first config with no spills whose shared memory fits the target. Measured:
#   D=256 64x32 w8 s2: 0 spills; shared 69632 (sm80/86/89/120), 98304 (sm90), 98848 (sm100)
#   D=256 64x64 w8 s2: 0 spills on sm100 (164896 B); 44-84 B spills on sm80/86/90/120
#   D=512 32x32 w8 s2: 0 spills; 100352 B everywhere (fits the 99 KiB of sm86/89/120)
#   D=512 64x32 w8 s2: 44-1340 B spills; 4-warp configs spill 80-320 B (the fp32 accumulator is 32xD)


def fwd_configs(head_dim: int, target: str | None = None) -> list[triton.Config]:
    """Tile candidates for `_attn_fwd_kernel` on a target ("sm90"; None: any), best first."""
    if head_dim >= 512:
        shapes = [(32, 32, 8, 2), (16, 32, 4, 2)]
    elif head_dim >= 256:
        shapes = [(64, 32, 8, 2), (32, 32, 4, 2)]
        if target == "sm100":
            shapes.insert(0, (64, 64, 8, 2))
    else:
        shapes = [(64, 64, 4, 2), (32, 32, 4, 2)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in shapes
    ]


# Largest dynamic shared memory ptxas/Triton gave a tile over sm80..sm120 (bf16/fp16); others are estimated.
_FWD_SHARED = {(256, 64, 64, 8, 2): 164896, (256, 64, 32, 8, 2): 98848, (512, 32, 32, 8, 2): 100352}


def fwd_shared_bytes(conf: triton.Config, head_dim: int) -> int:
    """Shared memory of a tile: measured when known, else Q tile + num_stages x (K + V) tiles at 2 bytes."""
    key = (head_dim, conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"], conf.num_warps, conf.num_stages)
    if key in _FWD_SHARED:
        return _FWD_SHARED[key]
    return 2 * head_dim * (conf.kwargs["BLOCK_M"] + 2 * conf.kwargs["BLOCK_N"] * max(conf.num_stages, 1))


def keep_fwd(conf: triton.Config, head_dim: int, max_shared_bytes: int, group: int = 1) -> bool:
    """Prune tiles that cannot hold one position of each of the `group` query heads of a KV head (nor the 16
    rows tl.dot needs), or whose shared memory exceeds the target's."""
    return conf.kwargs["BLOCK_M"] >= max(16, group) and fwd_shared_bytes(conf, head_dim) <= max_shared_bytes


def fwd_tile(head_dim: int, group: int, target: GpuTarget | None) -> triton.Config:
    """The one tile choice for the fused attention on a target (None: unknown GPU, 99 KiB of shared memory):
    the first candidate that holds the GQA group and fits. The torch wrapper, `gemma4-compile kernels` and the
    TensorRT AOT plugins all pick through here, so a plugin build finds what `kernels` compiled."""
    name, smem = (target.name, target.max_shared_bytes) if target else (None, 99 * 1024)
    confs = [c for c in fwd_configs(head_dim, name) if keep_fwd(c, head_dim, smem, group)]
    if not confs:
        raise Gemma4CompileError(
            f"attention kernel: no tile for head_dim {head_dim}, GQA group {group} on {name}"
        )
    return confs[0]


def aot_config(
    head_dim: int, group: int, dtype: str, scale: float, target: GpuTarget, blocks: bool = False,
    sliding: bool = True,
) -> tuple[dict[str, Any], int, int]:  # fmt: skip
    """(constexprs, num_warps, num_stages) of the fused single-launch attention for one layer on one target:
    what a TensorRT AOT plugin compiles; dtype is "bf16", "fp16" or "fp32". `blocks`: the node takes
    block_ids (`attn_fwd_blocks` in plugins/aot.py, BLK_ptr a real pointer); only a `sliding` layer reads it
    (HAS_BLOCKS): a full layer ignores it, and so compiles the causal code (its D=512 tile has no registers to
    spare: with HAS_BLOCKS it spills 24-96 B on sm89/sm90)."""
    conf = fwd_tile(head_dim, group, target)
    constexprs = {
        **conf.kwargs, "HEAD_DIM": head_dim, "SCALE": float(scale), "FUSE_RING": True,
        "BLOCK_R": ring_block(head_dim), "INPUT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
        "HAS_BLOCKS": blocks and sliding, **({} if blocks else {"BLK_ptr": None}),
    }  # fmt: skip
    return constexprs, conf.num_warps, conf.num_stages


@triton.jit
def _attn_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, PK_ptr, PV_ptr, PastLen_ptr, SeqLen_ptr, BLK_ptr,
    q_stride_b, q_stride_h, q_stride_s, k_stride_b, k_stride_h, k_stride_s,
    v_stride_b, v_stride_h, v_stride_s, pk_stride_b, pk_stride_h, pk_stride_s,
    pv_stride_b, pv_stride_h, pv_stride_s, o_stride_b, o_stride_h, o_stride_s,
    pko_stride_b, pko_stride_h, pko_stride_s, pvo_stride_b, pvo_stride_h, pvo_stride_s,
    seq, slots, num_kv_heads, group, window,
    O_ptr, PKO_ptr, PVO_ptr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCALE: tl.constexpr,
    FUSE_RING: tl.constexpr, BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr, HAS_BLOCKS: tl.constexpr,
):  # fmt: skip
    """out[b, h, s] = softmax_j(SCALE q.k_j) v_j over visible key positions j (module docstring), for one
    (batch row, KV head) and BLOCK_M // group query positions x `group` heads; programs past the query blocks
    write the ring presents when FUSE_RING. HAS_BLOCKS: BLK_ptr holds block_ids [B, seq] int64 (contiguous);
    otherwise it is None and never read.

    grid = (cdiv(seq, BLOCK_M // group) + (cdiv(slots, BLOCK_R) if FUSE_RING else 0), B * num_kv_heads)
    """
    pid = tl.program_id(0)
    b = tl.program_id(1) // num_kv_heads
    kvh = tl.program_id(1) % num_kv_heads
    past_len = tl.load(PastLen_ptr + b).to(tl.int32)
    seq_len = tl.load(SeqLen_ptr + b).to(tl.int32)
    positions_per_block = BLOCK_M // group
    n_q_blocks = tl.cdiv(seq, positions_per_block)
    b64 = b.to(tl.int64)
    kvh64 = kvh.to(tl.int64)
    k_base = K_ptr + b64 * k_stride_b + kvh64 * k_stride_h
    v_base = V_ptr + b64 * v_stride_b + kvh64 * v_stride_h
    pk_base = PK_ptr + b64 * pk_stride_b + kvh64 * pk_stride_h
    pv_base = PV_ptr + b64 * pv_stride_b + kvh64 * pv_stride_h
    if pid < n_q_blocks:
        # rows r -> (position s0 + r // group, head kvh * group + r % group)
        r = tl.arange(0, BLOCK_M)
        s = pid * positions_per_block + r // group
        head = kvh * group + r % group
        row_valid = (r < positions_per_block * group) & (s < seq)
        offs_d = tl.arange(0, HEAD_DIM)
        q_rows = b64 * q_stride_b + head.to(tl.int64) * q_stride_h + s.to(tl.int64) * q_stride_s
        q = tl.load(Q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_valid[:, None], other=0.0)
        q_pos = past_len + s
        lo, hi, vis_lo, vis_hi = _visible_bounds(q_pos, past_len, seq_len, slots, window)
        row_empty = row_valid & (vis_lo > vis_hi)
        # block key range: the union of the valid rows' visible ranges, or all C + S keys if a row sees none
        p_start = tl.min(tl.where(row_valid, vis_lo, 2147483647), 0)
        p_end = tl.max(tl.where(row_valid, vis_hi, -2147483647), 0) + 1
        any_empty = tl.max(row_empty.to(tl.int32), 0) > 0
        p_start = tl.where(any_empty, past_len - slots, p_start)
        p_end = tl.where(any_empty, past_len + seq, p_end)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        if HAS_BLOCKS:  # blocks are a sliding-layer rule: a full layer's rows get no block
            blk_base = BLK_ptr + b64 * seq
            q_blk = tl.where(window > 0, tl.load(blk_base + s, mask=row_valid, other=-1).to(tl.int32), -1)
        else:
            blk_base = PastLen_ptr  # never read
            q_blk = tl.full([BLOCK_M], -1, dtype=tl.int32)
        acc, m_i, l_i = _attend(
            acc, m_i, l_i, q, q_pos, q_blk, row_empty,
            k_base, k_stride_s, v_base, v_stride_s, pk_base, pk_stride_s, pv_base, pv_stride_s, blk_base,
            past_len, lo, hi, slots, window, p_start, p_end, SCALE * LOG2E,
            HAS_BLOCKS, HEAD_DIM, BLOCK_N, INPUT_PRECISION,
        )  # fmt: skip
        if HAS_BLOCKS:  # block keys after the causal range, up to the last valid new token
            has_block = tl.max((q_blk >= 0).to(tl.int32), 0) > 0
            tail_start = tl.maximum(p_end, past_len)
            tail_end = tl.where(has_block, past_len + seq_len, tail_start)
            acc, m_i, l_i = _attend_block_tail(
                acc, m_i, l_i, q, q_blk, k_base, k_stride_s, v_base, v_stride_s, blk_base,
                past_len, tail_start, tail_end, SCALE * LOG2E, HEAD_DIM, BLOCK_N, INPUT_PRECISION,
            )  # fmt: skip
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_rows = b64 * o_stride_b + head.to(tl.int64) * o_stride_h + s.to(tl.int64) * o_stride_s
        tl.store(
            O_ptr + o_rows[:, None] + offs_d[None, :], out.to(O_ptr.dtype.element_ty), mask=row_valid[:, None]
        )
    else:
        if FUSE_RING:
            j0 = (pid - n_q_blocks) * BLOCK_R
            pko = PKO_ptr + b64 * pko_stride_b + kvh64 * pko_stride_h
            pvo = PVO_ptr + b64 * pvo_stride_b + kvh64 * pvo_stride_h
            _ring_rows(k_base, k_stride_s, pk_base, pk_stride_s, pko, pko_stride_s,
                       j0, past_len, seq_len, slots, HEAD_DIM, BLOCK_R)  # fmt: skip
            _ring_rows(v_base, v_stride_s, pv_base, pv_stride_s, pvo, pvo_stride_s,
                       j0, past_len, seq_len, slots, HEAD_DIM, BLOCK_R)  # fmt: skip


# ----- decode: split-K over the visible range, then a log-sum-exp merge ---------------------------------


# Tiles for the split kernel (16 packed heads x BLOCK_N keys); decode is bandwidth-bound, so the deepest
# pipeline that fits: D=256 64 keys w8 s3 (141312 B) / w4 s2 (75776 B); D=512 32 keys w4 s3 (148480 B) / s2.


def decode_configs(head_dim: int, max_shared_bytes: int = 99 * 1024) -> list[triton.Config]:
    """Tile candidates for `_attn_decode_split_kernel`, best first, for a target's shared memory per block."""
    big = max_shared_bytes >= 160 * 1024
    if head_dim >= 512:
        shapes = [(32, 4, 3)] if big else [(32, 4, 2), (16, 4, 2)]
    else:
        shapes = [(64, 8, 3)] if big else [(64, 4, 2), (32, 4, 2)]
    return [triton.Config({"BLOCK_G": 16, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bn, w, st in shapes]


@triton.jit
def _attn_decode_split_kernel(
    Q_ptr, K_ptr, V_ptr, PK_ptr, PV_ptr, PastLen_ptr, SeqLen_ptr,
    q_stride_b, q_stride_h, k_stride_b, k_stride_h, v_stride_b, v_stride_h,
    pk_stride_b, pk_stride_h, pk_stride_s, pv_stride_b, pv_stride_h, pv_stride_s,
    slots, num_kv_heads, group, window, num_splits,
    MidO_ptr, MidML_ptr,
    HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SCALE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Partial attention of the one new query (S == 1) of the `group` heads of a KV head over split
    `program_id(0)` of its visible positions: MidO[b, h, split] = sum_j 2^(s_j - m) v_j (fp32, unnormalized),
    MidML[b, h, split] = (m, l = sum_j 2^(s_j - m)).  MidO is [B, Hq, num_splits, HEAD_DIM] fp32 contiguous,
    MidML [B, Hq, num_splits, 2] fp32 contiguous.

    grid = (num_splits, B * num_kv_heads)
    """
    split = tl.program_id(0)
    b = tl.program_id(1) // num_kv_heads
    kvh = tl.program_id(1) % num_kv_heads
    past_len = tl.load(PastLen_ptr + b).to(tl.int32)
    seq_len = tl.load(SeqLen_ptr + b).to(tl.int32)
    g = tl.arange(0, BLOCK_G)
    head = kvh * group + g
    row_valid = g < group
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    kvh64 = kvh.to(tl.int64)
    q_rows = b64 * q_stride_b + head.to(tl.int64) * q_stride_h
    q = tl.load(Q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_valid[:, None], other=0.0)
    q_pos = tl.zeros([BLOCK_G], dtype=tl.int32) + past_len
    lo, hi, vis_lo, vis_hi = _visible_bounds(q_pos, past_len, seq_len, slots, window)
    row_empty = row_valid & (vis_lo > vis_hi)
    # every row of this program has the same position, so its range is the same for all rows
    empty = tl.max(row_empty.to(tl.int32), 0) > 0
    p_start = tl.where(empty, past_len - slots, tl.max(vis_lo, 0))
    p_end = tl.where(empty, past_len + 1, tl.max(vis_hi, 0) + 1)
    per_split = tl.cdiv(tl.cdiv(p_end - p_start, num_splits), BLOCK_N) * BLOCK_N
    start = p_start + split * per_split
    end = tl.minimum(p_end, start + per_split)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc, m_i, l_i = _attend(
        acc, m_i, l_i, q, q_pos, q_pos, row_empty,  # no blocks: a one-token step's block is itself
        K_ptr + b64 * k_stride_b + kvh64 * k_stride_h, 0, V_ptr + b64 * v_stride_b + kvh64 * v_stride_h, 0,
        PK_ptr + b64 * pk_stride_b + kvh64 * pk_stride_h, pk_stride_s,
        PV_ptr + b64 * pv_stride_b + kvh64 * pv_stride_h, pv_stride_s, PastLen_ptr,
        past_len, lo, hi, slots, window, start, end, SCALE * LOG2E,
        False, HEAD_DIM, BLOCK_N, INPUT_PRECISION,
    )  # fmt: skip
    mid = (b64 * num_kv_heads * group + head.to(tl.int64)) * num_splits + split
    tl.store(MidO_ptr + mid[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_valid[:, None])
    tl.store(MidML_ptr + mid * 2, m_i, mask=row_valid)
    tl.store(MidML_ptr + mid * 2 + 1, l_i, mask=row_valid)


@triton.jit
def _attn_decode_combine_kernel(
    MidO_ptr, MidML_ptr, o_stride_b, o_stride_h, num_heads, num_splits, O_ptr, HEAD_DIM: tl.constexpr
):
    """out[b, h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, M = max_s m_s.   grid = (B * Hq,)"""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // num_heads
    h = bh % num_heads
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    m = float("-inf")
    total = 0.0
    for i in range(num_splits):
        mid = bh * num_splits + i
        m_s = tl.load(MidML_ptr + mid * 2)
        l_s = tl.load(MidML_ptr + mid * 2 + 1)
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        beta = tl.exp2(m_s - m_safe)
        acc = acc * alpha + tl.load(MidO_ptr + mid * HEAD_DIM + offs_d) * beta
        total = total * alpha + l_s * beta
        m = m_new
    out = acc / tl.where(total == 0.0, 1.0, total)
    tl.store(O_ptr + b * o_stride_b + h * o_stride_h + offs_d, out.to(O_ptr.dtype.element_ty))


# ----- cache update ---------------------------------------------------------------------------------


@triton.jit
def _ring_update_kernel(
    New_ptr, Past_ptr, PastLen_ptr, SeqLen_ptr,
    new_stride_b, new_stride_h, new_stride_s, past_stride_b, past_stride_h, past_stride_s,
    out_stride_b, out_stride_h, out_stride_s, seq, slots, num_kv_heads,
    Out_ptr,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, COPY_PAST: tl.constexpr,
):  # fmt: skip
    """Ring write of the valid new tokens s < seq_len into slot (past_len + s) mod C; the last C win.
    COPY_PAST: Out is a fresh ring, every slot written (grid dim 0 = cdiv(slots, BLOCK_R)).
    not COPY_PAST: Out aliases Past, only the kept new tokens are written (grid dim 0 = cdiv(seq, BLOCK_R)).

    grid = (cdiv(slots if COPY_PAST else seq, BLOCK_R), B * num_kv_heads)
    """
    pid = tl.program_id(0)
    b = (tl.program_id(1) // num_kv_heads).to(tl.int64)
    kvh = (tl.program_id(1) % num_kv_heads).to(tl.int64)
    past_len = tl.load(PastLen_ptr + b).to(tl.int32)
    seq_len = tl.load(SeqLen_ptr + b).to(tl.int32)
    new = New_ptr + b * new_stride_b + kvh * new_stride_h
    out = Out_ptr + b * out_stride_b + kvh * out_stride_h
    if COPY_PAST:
        past = Past_ptr + b * past_stride_b + kvh * past_stride_h
        _ring_rows(new, new_stride_s, past, past_stride_s, out, out_stride_s,
                   pid * BLOCK_R, past_len, seq_len, slots, HEAD_DIM, BLOCK_R)  # fmt: skip
    else:
        offs_d = tl.arange(0, HEAD_DIM)
        s = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        keep = (s < seq) & (s < seq_len) & (s >= seq_len - slots)
        slot = _ring_slot(past_len + s, slots)
        rows = tl.load(new + s[:, None].to(tl.int64) * new_stride_s + offs_d[None, :], mask=keep[:, None])
        tl.store(out + slot[:, None].to(tl.int64) * out_stride_s + offs_d[None, :], rows, mask=keep[:, None])


# ----- torch-facing wrappers --------------------------------------------------------------------------


def ring_block(head_dim: int) -> int:
    """Slots per program for ring copies: ~8K elements per program."""
    return max(1, min(64, 8192 // head_dim))


def input_precision(dtype: torch.dtype) -> str:
    """fp32 I/O must not silently drop to TF32 in tl.dot; 16-bit inputs are exact in either mode."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(
    q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, block_ids: Tensor | None = None
) -> None:
    B, Hq, S, D = q.shape
    Hkv, C = k.shape[1], past_k.shape[2]
    if D not in SUPPORTED_HEAD_DIMS:
        raise Gemma4CompileError(f"attention kernel: head_dim {D} not in {SUPPORTED_HEAD_DIMS}")
    if Hkv == 0 or Hq % Hkv:
        raise Gemma4CompileError(f"attention kernel: {Hq} query heads is not a multiple of {Hkv} KV heads")
    if Hq // Hkv > 16:
        raise Gemma4CompileError(f"attention kernel: GQA group {Hq // Hkv} exceeds 16")
    if S < 1 or C < 1:
        raise Gemma4CompileError(f"attention kernel: need S >= 1 and C >= 1 cache slots, got S={S}, C={C}")
    for name, t, shape in (("k", k, (B, Hkv, S, D)), ("v", v, (B, Hkv, S, D)),
                           ("past_k", past_k, (B, Hkv, C, D)), ("past_v", past_v, (B, Hkv, C, D))):  # fmt: skip
        if tuple(t.shape) != shape or t.dtype != q.dtype:
            raise Gemma4CompileError(
                f"attention kernel: {name} is {tuple(t.shape)} {t.dtype}, want {shape} {q.dtype}"
            )
    if block_ids is not None and (tuple(block_ids.shape) != (B, S) or block_ids.dtype != torch.int64):
        raise Gemma4CompileError(
            f"attention kernel: block_ids is {tuple(block_ids.shape)} {block_ids.dtype}, want {(B, S)} torch.int64"
        )


def _last_dim_contiguous(*ts: Tensor) -> list[Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _fwd_config(head_dim: int, group: int) -> triton.Config:
    """The local GPU's tile (`fwd_tile`); under the interpreter the smallest (CPU time grows with tile count less
    than with tile size)."""
    if _interpreting() or not torch.cuda.is_available():
        return triton.Config({"BLOCK_M": max(16, triton.next_power_of_2(group)), "BLOCK_N": 16}, num_warps=4)
    return fwd_tile(head_dim, group, local_target())


def _decode_config(head_dim: int) -> triton.Config:
    if _interpreting() or not torch.cuda.is_available():
        return triton.Config({"BLOCK_G": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
    target = local_target()
    return decode_configs(head_dim, target.max_shared_bytes if target else 99 * 1024)[0]


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def decode_splits(batch: int, kv_heads: int, slots: int, block_n: int, sms: int) -> int:
    """As many splits as fill one wave (a split program's deep pipeline takes most of an SM's shared memory, so one
    runs per SM), never more than the cache has key tiles. On an H200 (132 SMs) one wave beat the earlier two
    programs per SM by 1.2-1.6x (26B-A4B and 31B, sliding and global layers), and a wave and a bit (136
    programs) ran 1.3x slower than 128 (RESULTS.md)."""
    return max(1, min(sms // max(batch * kv_heads, 1), math.ceil((slots + 1) / block_n), 1024))


def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, past_len: Tensor, seq_len: Tensor,
    window: int, scale: float, *, config: triton.Config | None = None, fuse_ring: bool = True,
    block_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:  # fmt: skip
    """One launch of `_attn_fwd_kernel`: out, and the presents when fuse_ring (else None, None);
    `block_ids` [B, S] int64 contiguous: the image blocks of a sliding layer (module docstring)."""
    B, Hq, S, D = q.shape
    Hkv, C = k.shape[1], past_k.shape[2]
    G = Hq // Hkv
    conf = config or _fwd_config(D, G)
    block_m = conf.kwargs["BLOCK_M"]
    if block_m < G:
        raise Gemma4CompileError(f"attention kernel: BLOCK_M {block_m} is smaller than the GQA group {G}")
    out = torch.empty_like(q)
    pk_out = torch.empty_like(past_k) if fuse_ring else past_k
    pv_out = torch.empty_like(past_v) if fuse_ring else past_v
    block_r = ring_block(D)
    grid = (triton.cdiv(S, block_m // G) + (triton.cdiv(C, block_r) if fuse_ring else 0), B * Hkv)
    _attn_fwd_kernel[grid](
        q, k, v, past_k, past_v, past_len, seq_len, block_ids,
        *_strides(q), *_strides(k), *_strides(v), *_strides(past_k), *_strides(past_v),
        *_strides(out), *_strides(pk_out), *_strides(pv_out),
        S, C, Hkv, G, window, out, pk_out, pv_out,
        HEAD_DIM=D, SCALE=float(scale), FUSE_RING=fuse_ring, BLOCK_R=block_r,
        INPUT_PRECISION=input_precision(q.dtype), HAS_BLOCKS=block_ids is not None,
        num_warps=conf.num_warps, num_stages=conf.num_stages,
        **conf.kwargs,
    )  # fmt: skip
    return out, (pk_out if fuse_ring else None), (pv_out if fuse_ring else None)


def attention_decode(
    q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, past_len: Tensor, seq_len: Tensor,
    window: int, scale: float, *, num_splits: int | None = None, config: triton.Config | None = None,
) -> Tensor:  # fmt: skip
    """Flash-decoding for S == 1: split kernel + combine kernel; returns out only (the cache is untouched)."""
    B, Hq, S, D = q.shape
    Hkv, C = k.shape[1], past_k.shape[2]
    if S != 1:
        raise Gemma4CompileError(f"attention decode kernel: needs S == 1, got {S}")
    G = Hq // Hkv
    conf = config or _decode_config(D)
    if conf.kwargs["BLOCK_G"] < G:
        raise Gemma4CompileError(f"attention decode kernel: BLOCK_G {conf.kwargs['BLOCK_G']} < GQA group {G}")
    splits = num_splits or decode_splits(B, Hkv, C, conf.kwargs["BLOCK_N"], _num_sms(q.device))
    mid_o = torch.empty(B, Hq, splits, D, device=q.device, dtype=torch.float32)
    mid_ml = torch.empty(B, Hq, splits, 2, device=q.device, dtype=torch.float32)
    _attn_decode_split_kernel[(splits, B * Hkv)](
        q, k, v, past_k, past_v, past_len, seq_len,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *_strides(past_k), *_strides(past_v), C, Hkv, G, window, splits, mid_o, mid_ml,
        HEAD_DIM=D, SCALE=float(scale), INPUT_PRECISION=input_precision(q.dtype),
        num_warps=conf.num_warps, num_stages=conf.num_stages, **conf.kwargs,
    )  # fmt: skip
    out = torch.empty_like(q)
    _attn_decode_combine_kernel[(B * Hq,)](
        mid_o, mid_ml, out.stride(0), out.stride(1), Hq, splits, out, HEAD_DIM=D, num_warps=4
    )
    return out


def ring_update(
    past: Tensor, new: Tensor, past_len: Tensor, seq_len: Tensor, *, out: Tensor | None = None
) -> Tensor:
    """`ops.ring_update` on the GPU: a fresh ring (out=None or a separate buffer), or in place when out is past."""
    B, Hkv, C, D = past.shape
    S = new.shape[2]
    in_place = out is not None and out.data_ptr() == past.data_ptr()
    out = torch.empty_like(past) if out is None else out
    past, new = _last_dim_contiguous(past, new)
    block_r = ring_block(D)
    grid = (triton.cdiv(S if in_place else C, block_r), B * Hkv)
    _ring_update_kernel[grid](
        new, past, past_len, seq_len, *_strides(new), *_strides(past), *_strides(out), S, C, Hkv, out,
        HEAD_DIM=D, BLOCK_R=block_r, COPY_PAST=not in_place, num_warps=4,
    )  # fmt: skip
    return out


def attention(
    q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, past_len: Tensor, seq_len: Tensor,
    window: int, scale: float, block_ids: Tensor | None = None, *, num_splits: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """`gemma4::attention` (same signature and results as `ops.attention_reference`) on Triton kernels.

    S > 1 (or num_splits == 0): one fused launch (attention + ring presents). S == 1: flash-decoding (split
    kernel + combine) and a ring-update launch. num_splits overrides the decode split count. `block_ids`
    [B, S] int64 (image blocks, sliding layers): a one-token step's block holds only that token, which it
    sees anyway, so decode ignores it.
    """
    _check(q, k, v, past_k, past_v, block_ids)
    q, k, v, past_k, past_v = _last_dim_contiguous(q, k, v, past_k, past_v)
    past_len, seq_len = past_len.contiguous(), seq_len.contiguous()
    blocks = block_ids.contiguous() if block_ids is not None and window > 0 else None  # full layers: none
    if q.shape[2] == 1 and num_splits != 0:
        out = attention_decode(
            q, k, v, past_k, past_v, past_len, seq_len, window, scale, num_splits=num_splits
        )
        return out, ring_update(past_k, k, past_len, seq_len), ring_update(past_v, v, past_len, seq_len)
    out, present_k, present_v = attention_fwd(
        q, k, v, past_k, past_v, past_len, seq_len, window, scale, block_ids=blocks
    )
    return out, cast(Tensor, present_k), cast(Tensor, present_v)  # fuse_ring=True always returns them
