"""Quantized gathered tables in the embed graph: `Gather(W, ids)` -> the rows' codes times the rows' scales.

The token embedding and the PLE table are read by row, never as matrices, so they are dequantized after the
gather, row by row, in standard ops any backend runs (no blockwise DequantizeLinear, which TensorRT accepts on
constant weights only):

    Reshape(Cast(Gather(codes [V, blocks, block], ids)) * Unsqueeze(Gather(scales [V, blocks], ids), -1),
            Shape(ids) ++ [blocks * block])                      (then Slice to K if K is not whole blocks)

The codes and scales stay plain initializers gathered by the same indices as the float table was, so a runtime
may feed only the rows a call needs in their place (runners/rows.py).
"""

from __future__ import annotations

import onnx_ir as ir

from .quantize_matmul import DQWeight, WeightRewrite, _initializer, _int64

__all__ = ["DequantizeRows"]


class DequantizeRows(WeightRewrite):
    """`weights`: initializer name -> its int8 row codes and scales (DQWeight); every `Gather(W, ids)` (axis 0)
    reads the dequantized rows instead."""

    def requires(self, model: ir.Model) -> None:
        for name in self.weights:
            for use in self.initializer(model, name).uses():
                if not _is_row_gather(use.node, use.idx):
                    raise ir.passes.PreconditionError(
                        f"quantized table '{name}' feeds {use.node.op_type} ({use.node.name}); only "
                        "Gather(W, ids) along axis 0 can read int8 rows"
                    )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.replaced = 0
        for name, q in self.weights.items():
            value = graph.initializers.pop(name)
            codes = _initializer(graph, _blocked(q.codes, q.block_size))
            scales = _initializer(graph, q.scales)
            for gather in [use.node for use in value.uses()]:
                _replace(graph, gather, codes, scales, q, value.dtype)
                self.replaced += 1
        return ir.passes.PassResult(model, modified=self.replaced > 0)


def _is_row_gather(node: ir.Node, idx: int) -> bool:
    axis = node.attributes.get("axis")
    return (
        node.op_type == "Gather"
        and node.domain in ("", "ai.onnx")
        and idx == 0
        and (axis is None or axis.as_int() == 0)
    )


def _blocked(codes: ir.ExternalTensor, block: int) -> ir.ExternalTensor:
    """The same bytes seen as [V, blocks, block], so one gather yields each row's blocks."""
    rows, width = codes.shape
    return ir.ExternalTensor(
        codes.location,
        codes.offset,
        codes.length,
        codes.dtype,
        shape=ir.Shape([rows, width // block, block]),
        name=codes.name,
        base_dir=codes.base_dir,
    )


def _replace(
    graph: ir.Graph, gather: ir.Node, codes: ir.Value, scales: ir.Value, q: DQWeight, dtype: ir.DataType
) -> None:
    ids = gather.inputs[1]
    blocks, block = codes.shape[1], codes.shape[2]
    width = _constant(graph, f"{codes.name}_width", blocks * block)
    nodes = [
        ir.node("Gather", [codes, ids], {"axis": 0}),
        ir.node("Gather", [scales, ids], {"axis": 0}),
    ]
    nodes.append(ir.node("Cast", [nodes[0].outputs[0]], {"to": dtype}))
    nodes.append(ir.node("Unsqueeze", [nodes[1].outputs[0], _constant(graph, f"{codes.name}_last", -1)]))
    nodes.append(ir.node("Mul", [nodes[2].outputs[0], nodes[3].outputs[0]]))
    nodes.append(ir.node("Shape", [ids]))
    nodes.append(ir.node("Concat", [nodes[5].outputs[0], width], {"axis": 0}))
    nodes.append(ir.node("Reshape", [nodes[4].outputs[0], nodes[6].outputs[0]]))
    if blocks * block != q.k:  # the codes' rows are padded to whole blocks
        bounds = [
            _constant(graph, f"{codes.name}_{n}", v) for n, v in (("starts", 0), ("ends", q.k), ("axes", -1))
        ]
        nodes.append(ir.node("Slice", [nodes[-1].outputs[0], *bounds]))
    for node in nodes:
        graph.insert_before(gather, node)
    old, new = gather.outputs[0], nodes[-1].outputs[0]
    name, new.shape, new.type = old.name, old.shape, old.type
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    graph.remove(gather, safe=True)
    new.name = name


def _constant(graph: ir.Graph, name: str, value: int) -> ir.Value:
    """A one-element int64 initializer, shared by every gather of the same table."""
    if name in graph.initializers:
        return graph.initializers[name]
    return _initializer(graph, _int64(name, value))
