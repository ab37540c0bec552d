"""`gemma4::SlidingWindowAttention`: attention for one layer with its ring-buffer KV-cache update.

Semantics: `gemma4_compile.model.ops.attention` (ring of C slots, window W keys including self, GQA; with the
optional `block_ids`, sliding layers let each image run attend both ways inside itself).
"""

from __future__ import annotations

import dataclasses

from ..contract import ACTIVATIONS, LENGTHS, PLUGIN_ATTRS, Attr, OpContract, Param

SLIDING_WINDOW_ATTENTION = OpContract(
    op_type="SlidingWindowAttention",
    doc="Gemma 4 attention for one layer with its ring-buffer KV-cache update (see model/ops.py).",
    inputs=(
        Param("q", shape="[B,Hq,S,D]"),
        Param("k", shape="[B,Hkv,S,D]"),
        Param("v", shape="[B,Hkv,S,D]"),
        Param("past_k", shape="[B,Hkv,C,D]"),
        Param("past_v", shape="[B,Hkv,C,D]"),
        Param("past_len", "I", "[B]"),
        Param("seq_len", "I", "[B]"),
        # 26B/31B image prompts: -1 text/audio, k for the k-th image run of the call; absent = plain causal
        Param("block_ids", "I", "[B,S]", optional=True),
    ),
    outputs=(
        Param("out", shape="[B,Hq,S,D]"),
        Param("present_k", shape="[B,Hkv,C,D]"),
        Param("present_v", shape="[B,Hkv,C,D]"),
    ),
    type_constraints=(ACTIVATIONS, LENGTHS),
    attributes=(
        Attr("window", "int", "sliding window W (keys incl. self); 0 = global"),
        Attr("scale", "float", "score multiplier (1.0 for Gemma 4)"),
        *PLUGIN_ATTRS,
    ),
    output_like=(0, 3, 4),
)

# Full TensorRT's AOT plugin for the 8-input form: a quickly deployable plugin's signature fixes its input count,
# so the engine builder gives nodes that carry block_ids this op type when the plugin is registered
# (passes/block_attention.py). Same semantics; never in an export.
SLIDING_WINDOW_ATTENTION_BLOCKS = dataclasses.replace(
    SLIDING_WINDOW_ATTENTION,
    op_type="SlidingWindowAttentionBlocks",
    doc="SlidingWindowAttention with its block_ids input (full TensorRT's 8-input plugin; engine build only).",
    inputs=(*SLIDING_WINDOW_ATTENTION.inputs[:-1], Param("block_ids", "I", "[B,S]")),
    exported=False,
)
