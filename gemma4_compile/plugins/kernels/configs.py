"""The variants compiled ahead of time for one target: exactly the tiles the torch wrappers pick on that GPU.

Each variant is (kernel name in `plugins.aot.KERNELS`, dtype, constexprs, num_warps, num_stages). The one tile
chooser of the AOT launches: `gemma4-compile kernels` (aot.default_variants) compiles what these return, and
the full-TensorRT plugins (qdp.py) ask them for the variant of a layer, so the two always agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...targets import GpuTarget
from .attention import aot_config, decode_configs, ring_block
from .moe import aot_configs

VariantTuple = tuple[str, str, dict[str, Any], int, int]
GLOBAL_HEAD_DIM = 512  # Gemma 4's full-attention layers (`global_head_dim`); sliding layers have 256

DECODE_ROWS_PER_EXPERT = 1  # a decode step routes ~1 row to each hit expert
PREFILL_ROWS_PER_EXPERT = 256  # 4096 tokens x top-8 over 128 experts
SORT_KERNELS = (
    "moe_count",
    "moe_offsets",
    "moe_scatter",
)  # integer-only: compiled once per target, dtype i32


def attention_fwd_variant(
    target: GpuTarget, dtype: str, head_dim: int, group: int = 1, scale: float = 1.0, blocks: bool = False,
    sliding: bool = True,
) -> VariantTuple:  # fmt: skip
    """The fused single-launch attention (attention + ring presents) of one layer; `blocks`: the variant that
    takes image block_ids (26B/31B exports with images), which only a `sliding` layer reads."""
    constexprs, warps, stages = aot_config(head_dim, group, dtype, scale, target, blocks, sliding)
    return ("attn_fwd_blocks" if blocks else "attn_fwd"), dtype, constexprs, warps, stages


def moe_stage_variants(
    target: GpuTarget, dtype: str, experts: int, top_k: int, rows_per_expert: float
) -> dict[str, VariantTuple]:
    """The seven MoE launches of one layer by kernel name; the sort kernels are dtype-free (i32)."""
    return {
        kernel: (kernel, "i32" if kernel in SORT_KERNELS else dtype, constexprs, warps, stages)
        for kernel, (constexprs, warps, stages) in aot_configs(
            experts, top_k, dtype, target.max_shared_bytes, rows_per_expert
        ).items()
    }


def attention_variants(
    target: GpuTarget, dtype: str, head_dims: Sequence[int], scale: float = 1.0
) -> list[VariantTuple]:
    """Fused attention + ring, flash-decoding split + combine, and both ring-update modes, per head_dim."""
    prec = "ieee" if dtype == "fp32" else "tf32"
    out: list[VariantTuple] = []
    for d in head_dims:
        out.append(attention_fwd_variant(target, dtype, d, 1, scale))
        # with block_ids as Gemma 4 has them: sliding layers at D=256, full layers (which ignore them) at 512
        out.append(
            attention_fwd_variant(target, dtype, d, 1, scale, blocks=True, sliding=d < GLOBAL_HEAD_DIM)
        )
        dec = decode_configs(d, target.max_shared_bytes)[0]
        out.append(("attn_decode_split", dtype, {**dec.kwargs, "HEAD_DIM": d, "SCALE": scale, "INPUT_PRECISION": prec},
                    dec.num_warps, dec.num_stages))  # fmt: skip
        out.append(("attn_decode_combine", dtype, {"HEAD_DIM": d}, 4, 1))
        for copy in (True, False):
            out.append(
                ("ring_update", dtype, {"HEAD_DIM": d, "BLOCK_R": ring_block(d), "COPY_PAST": copy}, 4, 1)
            )
    return out


def moe_variants(target: GpuTarget, dtype: str, experts: int = 128, top_k: int = 8) -> list[VariantTuple]:
    """The seven MoE launches, with decode- and prefill-shaped GEMM tiles (sort kernels are dtype-free)."""
    return [
        v
        for rows in (DECODE_ROWS_PER_EXPERT, PREFILL_ROWS_PER_EXPERT)
        for v in moe_stage_variants(target, dtype, experts, top_k, rows).values()
    ]
