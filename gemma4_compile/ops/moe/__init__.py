"""`gemma4::MoE` (routing + GELU-tanh GLU experts) and its seven single-launch stages.

Semantics: `gemma4_compile.model.ops.moe`. The stages (`MoERoute` ... `MoECombine`) are the kernels of
plugins/kernels/moe.py as plugin nodes, for full TensorRT's AOT plugins (one launch each); only the engine
builder writes them (plugins/moe_stages.py). Their tensors are the kernels' buffers (`kernels.moe.BUFFERS`),
named after the kernels' pointer arguments ('SortedPairs_ptr' -> 'sorted_pairs').
"""

from __future__ import annotations

import re

from ..contract import ACTIVATIONS, FLOAT32, INT32, PLUGIN_ATTRS, Attr, OpContract, Param

MOE = OpContract(
    op_type="MoE",
    doc="Gemma 4 MoE block: router softmax/top-k/renormalize/per-expert scale and GELU-tanh GLU experts.",
    inputs=(
        Param("x", shape="[T,H]"),
        Param("router_logits", shape="[T,E]"),
        Param("per_expert_scale", shape="[E]"),
        Param("gate_up", shape="[E,2I,H]"),
        Param("down", shape="[E,H,I]"),
    ),
    outputs=(Param("y", shape="[T,H]"),),
    type_constraints=(ACTIVATIONS,),
    attributes=(Attr("top_k", "int", "experts per token"), *PLUGIN_ATTRS),
    output_like=(0,),
    in_layer=lambda plan: plan.moe,
)

# Every stage node carries the same attributes: the int32 plugin fields, then `aot` (the ONNX parser's switch to
# a QDP's AOT implementation, not a plugin field) and the plugin attributes.
STAGE_ATTRS = (
    Attr("top_k", "int", "experts per token"),
    Attr("num_experts", "int", "router width E; the sort kernels see only expert ids"),
    Attr(
        "rows_per_expert", "int", "routed rows per expert at the engine's typical batch; picks the GEMM tile"
    ),
    Attr(
        "aot",
        "int",
        "the ONNX parser's switch to the QDP's AOT implementation",
        default=1,
        plugin_field=False,
    ),
    *PLUGIN_ATTRS,
)

# name -> type constraint and shape of every stage tensor (shapes in kernels.moe.BUFFERS' letters)
_TENSORS = {
    "logits": ("T", "[T,E]"),
    "scale": ("T", "[E]"),
    "x": ("T", "[T,H]"),
    "gate_up": ("T", "[E,2I,H]"),
    "down": ("T", "[E,H,I]"),
    "weights": ("F", "[T,K]"),
    "ids": ("I", "[T,K]"),
    "block_counts": ("I", "[NB,BE]"),
    "block_offsets": ("I", "[NB,BE]"),
    "expert_offsets": ("I", "[E+1]"),
    "tile_offsets": ("I", "[E+1]"),
    "sorted_pairs": ("I", "[N]"),
    "pair_rows": ("I", "[N]"),
    "h": ("T", "[N,I]"),
    "out": ("T", "[N,H]"),
    "y": ("T", "[T,H]"),
}
_CONSTRAINTS = {"T": ACTIVATIONS, "F": FLOAT32, "I": INT32}


def _stage(name: str, doc: str, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> OpContract:
    params = [Param(n, *_TENSORS[n]) for n in (*inputs, *outputs)]
    used = dict.fromkeys(p.type for p in params)
    return OpContract(
        op_type=f"MoE{name}",
        doc=doc,
        inputs=tuple(params[: len(inputs)]),
        outputs=tuple(params[len(inputs) :]),
        type_constraints=tuple(_CONSTRAINTS[t] for t in used),
        attributes=STAGE_ATTRS,
        exported=False,
    )


# In launch order; the I/O is the stage kernel's pointer arguments in order (tests/plugins checks them).
STAGES = (
    _stage("Route", "routing weights and expert ids", ("logits", "scale"), ("weights", "ids")),
    _stage("Count", "routed pairs per expert and sort block", ("ids",), ("block_counts",)),
    _stage(
        "Offsets",
        "prefix sums of the counts",
        ("block_counts",),
        ("block_offsets", "expert_offsets", "tile_offsets"),
    ),
    _stage(
        "Scatter",
        "pairs sorted by expert",
        ("ids", "block_offsets", "expert_offsets"),
        ("sorted_pairs", "pair_rows"),
    ),
    _stage(
        "GateUp",
        "GLU activations of the sorted rows",
        ("x", "gate_up", "sorted_pairs", "expert_offsets", "tile_offsets"),
        ("h",),
    ),
    _stage(
        "Down",
        "weighted expert rows",
        ("h", "down", "sorted_pairs", "weights", "expert_offsets", "tile_offsets"),
        ("out",),
    ),
    _stage("Combine", "sum of each token's expert rows", ("out", "pair_rows"), ("y",)),
)

# The Triton kernel (plugins/kernels/moe.py) that runs each stage, in the same order.
STAGE_KERNELS = tuple(
    "moe" + re.sub(r"([A-Z])", r"_\1", c.op_type.removeprefix("MoE")).lower() for c in STAGES
)
