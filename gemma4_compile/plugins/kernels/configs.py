"""The variants compiled ahead of time for one target: exactly the tiles the torch wrappers pick on that GPU.

Each variant is (kernel name in `plugins.aot.KERNELS`, dtype, constexprs, num_warps, num_stages).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import triton

from ...engines.targets import GpuTarget
from .attention import decode_configs, fwd_configs, ring_block
from .moe import BLOCK_P, gemm_configs

VariantTuple = tuple[str, str, dict[str, Any], int, int]

DECODE_ROWS_PER_EXPERT = 1  # a decode step routes ~1 row to each hit expert
PREFILL_ROWS_PER_EXPERT = 256  # 4096 tokens x top-8 over 128 experts


def _precision(dtype: str) -> str:
    return "ieee" if dtype == "fp32" else "tf32"


def attention_variants(
    target: GpuTarget, dtype: str, head_dims: Sequence[int], scale: float = 1.0
) -> list[VariantTuple]:
    """Fused attention + ring, flash-decoding split + combine, and both ring-update modes, per head_dim."""
    out: list[VariantTuple] = []
    for d in head_dims:
        fwd = fwd_configs(d, target.name)[0]
        out.append(("attn_fwd", dtype, {**fwd.kwargs, "HEAD_DIM": d, "SCALE": scale, "FUSE_RING": True,
                    "BLOCK_R": ring_block(d), "INPUT_PRECISION": _precision(dtype)}, fwd.num_warps, fwd.num_stages))  # fmt: skip
        dec = decode_configs(d, target.max_shared_bytes)[0]
        out.append(("attn_decode_split", dtype, {**dec.kwargs, "HEAD_DIM": d, "SCALE": scale,
                    "INPUT_PRECISION": _precision(dtype)}, dec.num_warps, dec.num_stages))  # fmt: skip
        out.append(("attn_decode_combine", dtype, {"HEAD_DIM": d}, 4, 1))
        for copy in (True, False):
            out.append(("ring_update", dtype, {"HEAD_DIM": d, "BLOCK_R": ring_block(d), "COPY_PAST": copy}, 4, 1))
    return out


def moe_variants(target: GpuTarget, dtype: str, experts: int = 128, top_k: int = 8) -> list[VariantTuple]:
    """Routing, the three sort kernels, decode- and prefill-shaped grouped GEMMs, and the combine."""
    block_e = triton.next_power_of_2(experts)
    out: list[VariantTuple] = [
        ("moe_route", dtype, {"TOP_K": top_k, "K_PAD": triton.next_power_of_2(top_k), "BLOCK_T": 16,
                              "BLOCK_E": block_e}, 4, 1),
        ("moe_count", "i32", {"BLOCK_P": BLOCK_P, "BLOCK_E": block_e}, 4, 1),
        ("moe_scatter", "i32", {"BLOCK_P": BLOCK_P, "BLOCK_E": block_e}, 4, 1),
        ("moe_combine", dtype, {"TOP_K": top_k, "BLOCK_H": 1024}, 4, 1),
    ]
    for rows in (DECODE_ROWS_PER_EXPERT, PREFILL_ROWS_PER_EXPERT):
        conf = gemm_configs(rows, target.max_shared_bytes)[0]
        tile = {**conf.kwargs, "BLOCK_E": block_e, "INPUT_PRECISION": _precision(dtype)}
        out.append(("moe_offsets", "i32", {"BLOCK_M": conf.kwargs["BLOCK_M"], "BLOCK_B": 16, "BLOCK_E": block_e}, 4, 1))
        out.append(("moe_gate_up", dtype, {**tile, "TOP_K": top_k}, conf.num_warps, conf.num_stages))
        out.append(("moe_down", dtype, tile, conf.num_warps, conf.num_stages))
    return out
