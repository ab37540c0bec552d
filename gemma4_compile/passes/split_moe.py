"""Split each `gemma4::MoE` node into the seven single-launch stage nodes of full TensorRT's AOT plugins.

A `tensorrt.plugin` `aot_impl` launches exactly one kernel, and the MoE needs seven with no grid-wide sync
between them (plugins/moe_stages.py holds the stage table: names, kernels, I/O by kernel pointer). Each stage
node reads and writes the kernels' buffers as ordinary tensors, so TensorRT allocates the intermediates as
activations and runs the seven launches in order. Every stage node carries `aot=1` and the int attributes
`top_k`, `num_experts` and `rows_per_expert` (the routed rows an expert gets at `tokens_hint` tokens per step,
which picks one GEMM tile for the offsets and both GEMM stages). The engine builder splits only when the stage
plugins are registered; onnxruntime and the inline path keep the fused node.
"""

from __future__ import annotations

import onnx_ir as ir

from ..errors import BuildError
from ..plugins.moe_stages import MOE_OP, OP_INPUTS, OP_OUTPUT, STAGES, stage_io
from ..plugins.registration import NAMESPACE, VERSION

__all__ = ["SplitMoE"]

_EXPERT_AXIS_INPUTS = (2, 3, 4)  # per_expert_scale [E], gate_up [E, 2I, H], down [E, H, I]


def _is_moe(node: ir.Node) -> bool:
    return node.domain == NAMESPACE and node.op_type == MOE_OP


def _num_experts(node: ir.Node, default: int | None) -> int:
    for position in _EXPERT_AXIS_INPUTS:
        value = node.inputs[position] if position < len(node.inputs) else None
        shape = value.shape if value is not None else None
        if shape is not None and shape.rank() and isinstance(shape[0], int):
            return shape[0]
    if default is None:
        raise BuildError(f"MoE node '{node.name}': cannot tell the number of experts from the graph")
    return default


def stage_fields(node: ir.Node, num_experts: int, tokens_hint: int) -> dict[str, int]:
    top_k = node.attributes["top_k"].as_int()
    return {
        "top_k": top_k,
        "num_experts": num_experts,
        "rows_per_expert": max(1, tokens_hint * top_k // num_experts),
    }


def stage_nodes(node: ir.Node, fields: dict[str, int]) -> tuple[list[ir.Node], ir.Value]:
    """The seven stage nodes of one MoE node, and the new value that stands for the node's output."""
    prefix = node.name or node.outputs[0].name
    tensors: dict[str, ir.Value] = {p: node.inputs[i] for p, i in OP_INPUTS.items()}
    attributes = {"plugin_namespace": NAMESPACE, "plugin_version": VERSION, "aot": 1, **fields}
    out = []
    for stage in STAGES:
        inputs, outputs = stage_io(stage)
        new = ir.node(
            stage.op_type,
            [tensors[p] for p in inputs],
            attributes=attributes,
            domain=NAMESPACE,
            name=f"{prefix}/{stage.op_type}",
            num_outputs=len(outputs),
        )
        for pointer, value in zip(outputs, new.outputs):
            value.name = f"{prefix}/{pointer.removesuffix('_ptr')}"
            tensors[pointer] = value
        out.append(new)
    return out, tensors[OP_OUTPUT]


class SplitMoE(ir.passes.InPlacePass):
    """`split` after a run: how many MoE nodes were replaced.

    tokens_hint: tokens per step the engine is tuned for (picks the GEMM tile through rows_per_expert).
    num_experts: used only when the graph does not show the experts' count on the node's weights.
    """

    def __init__(self, tokens_hint: int = 1, num_experts: int | None = None) -> None:
        super().__init__()
        self.tokens_hint, self.num_experts = tokens_hint, num_experts
        self.split = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.split = 0
        for node in [n for n in graph if _is_moe(n)]:
            fields = stage_fields(node, _num_experts(node, self.num_experts), self.tokens_hint)
            stages, new = stage_nodes(node, fields)
            graph.insert_after(node, stages)
            old = node.outputs[0]
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            new.name = old.name
            self.split += 1
        return ir.passes.PassResult(model, modified=self.split > 0)

    def ensures(self, model: ir.Model) -> None:
        if any(_is_moe(n) for n in model.graph):
            raise ir.passes.PostconditionError("a gemma4::MoE node is left after the split")
