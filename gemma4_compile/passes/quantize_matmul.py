"""Quantized weights in the graph, two encodings of one code stream (quant/formats.py):

* QuantizeMatMuls (onnxruntime, fp32 exports): `MatMul(x, Transpose(W))` -> `com.microsoft.MatMulNBits(x, B, scales)`.
* DequantizeWeights (TensorRT, fp16/bf16 exports, and any with fp8/nvfp4): W -> `DequantizeLinear(codes, scales,
  axis=1, block_size)`, a standard opset-21 blockwise DQ with no zero point, read by the graph's existing
  Transpose -> MatMul. nvfp4 (FLOAT4E2M1, opset 23) first dequantizes its E4M3 block scales by the tensor-wide
  scale: `DequantizeLinear(codes, DequantizeLinear(scales, global), axis=1, block_size=16)`.

QuantizeMatMuls:
The exporter traces torch's `x @ W.T` as a Transpose of the [N, K] weight initializer feeding a MatMul; the
quantized codes are stored in that same [N, K] row order (MatMulNBits' B is [N, blocks, blob]), so the Transpose
goes away with the float weight. Every use of a quantized initializer must be such a Transpose -> MatMul: any
other use would still need the float tensor, which the quantized export does not write.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

__all__ = ["MS_DOMAIN", "DQWeight", "DequantizeWeights", "NBitsWeight", "QuantizeMatMuls"]

MS_DOMAIN = "com.microsoft"
DQ_OPSET = 21  # blockwise DequantizeLinear and the INT4 type
FP4_OPSET = 23  # the FLOAT4E2M1 type


@dataclass(frozen=True)
class NBitsWeight:
    """The MatMulNBits inputs that replace one [N, K] weight initializer."""

    b: ir.TensorProtocol  # uint8 [N, blocks, block_size * bits / 8]
    scales: ir.TensorProtocol  # float [N, blocks]
    k: int
    n: int
    bits: int
    block_size: int
    accuracy_level: int = 0
    split: bool = False  # 8 bits stored as two 4-bit rows per row (b is [2N, blocks, block / 2])


class WeightRewrite(ir.passes.InPlacePass):
    """A pass replacing float initializers by quantized forms: `weights` maps initializer name -> its form;
    `replaced` after a run: how many nodes changed."""

    def __init__(self, weights: dict) -> None:
        super().__init__()
        self.weights = weights
        self.replaced = 0

    def initializer(self, model: ir.Model, name: str) -> ir.Value:
        value = model.graph.initializers.get(name)
        if value is None:
            raise ir.passes.PreconditionError(f"quantized weight '{name}' is not an initializer")
        return value


class QuantizeMatMuls(WeightRewrite):
    """`weights`: initializer name -> its MatMulNBits form."""

    def requires(self, model: ir.Model) -> None:
        for name in self.weights:
            for use in self.initializer(model, name).uses():
                bad = _not_weight_transpose(use.node)
                if bad is not None:
                    raise ir.passes.PreconditionError(
                        f"quantized weight '{name}' feeds {bad.op_type} ({bad.name}); only "
                        "MatMul(x, Transpose(W)) can be quantized"
                    )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.replaced = 0
        for name, q in self.weights.items():
            value = graph.initializers[name]
            b = _initializer(graph, q.b)
            scales = _initializer(graph, q.scales)
            for transpose in list(value.consumers()):
                for matmul in _consumers(transpose):
                    _replace(graph, matmul, b, scales, q)
                    self.replaced += 1
                graph.remove(transpose, safe=True)
            graph.initializers.pop(name)
        if self.replaced:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=self.replaced > 0)

    def ensures(self, model: ir.Model) -> None:
        left = [n for n in self.weights if n in model.graph.initializers]
        if left:
            raise ir.passes.PostconditionError(f"quantized weights still in the graph: {left}")


def _not_weight_transpose(node: ir.Node) -> ir.Node | None:
    """None when `node` is a [1, 0] Transpose read only as MatMul's B; else the node that breaks that."""
    perm = node.attributes.get("perm")
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return node
    if perm is not None and list(perm.as_ints()) != [1, 0]:
        return node
    for use in node.outputs[0].uses():
        if use.node.op_type != "MatMul" or use.node.domain not in ("", "ai.onnx") or use.idx != 1:
            return use.node
    return None


def _consumers(node: ir.Node) -> list[ir.Node]:
    return [u.node for u in node.outputs[0].uses()]


def _initializer(graph: ir.Graph, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(
        name=tensor.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor
    )
    graph.register_initializer(value)
    return value


def nbits_operands(b: ir.Value, scales: ir.Value, q: NBitsWeight) -> tuple[list[ir.Node], list[ir.Value]]:
    """MatMulNBits' weight inputs for W (B, scales, and zero points when split) and the nodes computing them.

    A split 8-bit weight (rtn.pack_matmulnbits_split) is read as 2N 4-bit rows: the high rows scaled by 16 s with
    zero point 8, the low rows by s with zero point 0. Those scales and zero points are computed from constants
    only, so onnxruntime folds them at session start; the nodes belong where W is a constant (the top level)."""
    if not q.split:
        return [], [b, scales]
    n, blocks = q.n, -(-q.k // q.block_size)
    zp_bytes = -(-blocks // 2)
    nodes: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value], attributes: dict | None = None) -> ir.Value:
        nodes.append(ir.node(op, inputs, attributes or {}))
        return nodes[-1].outputs[0]

    def const(array: np.ndarray) -> ir.Value:
        return add("Constant", [], {"value": ir.tensor(array)})

    axis1 = const(np.array([1], np.int64))
    high = add("Unsqueeze", [add("Mul", [scales, const(np.array(16, np.float32))]), axis1])
    stacked = add("Concat", [high, add("Unsqueeze", [scales, axis1])], {"axis": 1})  # [N, 2, blocks]
    row_scales = add("Reshape", [stacked, const(np.array([2 * n, blocks], np.int64))])
    pattern = const(np.array([[[0x88], [0x00]]], np.uint8))  # zero points 8 (high rows) and 0 (low rows)
    zp = add("Expand", [pattern, const(np.array([n, 2, zp_bytes], np.int64))])
    zp_rows = add("Reshape", [zp, const(np.array([2 * n, zp_bytes], np.int64))])
    return nodes, [b, row_scales, zp_rows]


def nbits_matmul(x: ir.Value, operands: list[ir.Value], q: NBitsWeight, rank: int) -> list[ir.Node]:
    """The nodes of x @ W.T for W in MatMulNBits form (x of `rank` dims, `operands` from nbits_operands); the
    last node's output is the result. A split 8-bit weight runs one 4-bit MatMulNBits over its 2N rows and sums
    each row pair: 16 * high + low is the 8-bit code, so the result is x @ (codes * s).T up to fp32 rounding."""
    attributes = {"K": q.k, "block_size": q.block_size, "accuracy_level": q.accuracy_level}
    if not q.split:
        return [
            ir.node("MatMulNBits", [x, *operands], {**attributes, "N": q.n, "bits": q.bits}, domain=MS_DOMAIN)
        ]
    both = ir.node("MatMulNBits", [x, *operands], {**attributes, "N": 2 * q.n, "bits": 4}, domain=MS_DOMAIN)
    pairs_shape = ir.node(
        "Constant", [], {"value": ir.tensor(np.array([0] * (rank - 1) + [q.n, 2], np.int64))}
    )
    paired = ir.node("Reshape", [both.outputs[0], pairs_shape.outputs[0]])
    last = ir.node("Constant", [], {"value": ir.tensor(np.array([-1], np.int64))})
    total = ir.node("ReduceSum", [paired.outputs[0], last.outputs[0]], {"keepdims": 0})
    return [both, pairs_shape, paired, last, total]


def _replace(graph: ir.Graph, matmul: ir.Node, b: ir.Value, scales: ir.Value, q: NBitsWeight) -> None:
    prep, operands = nbits_operands(b, scales, q)
    nodes = prep + nbits_matmul(matmul.inputs[0], operands, q, matmul.inputs[0].shape.rank())
    for i, node in enumerate(nodes):
        node.name = f"{matmul.name}_nbits_{i}" if matmul.name else None
    graph.insert_before(matmul, nodes)
    old, new = matmul.outputs[0], nodes[-1].outputs[0]
    name, new.shape, new.type = old.name, old.shape, old.type
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    graph.remove(matmul, safe=True)
    new.name = name


@dataclass(frozen=True)
class DQWeight:
    """The DequantizeLinear inputs that replace one [N, K] weight initializer."""

    codes: ir.TensorProtocol  # INT4 | INT8 | FLOAT8E4M3FN | FLOAT4E2M1 [N, K rounded up to whole blocks]
    scales: ir.TensorProtocol  # export dtype [N, blocks]; FLOAT8E4M3FN for nvfp4
    k: int
    block_size: int
    global_scale: ir.TensorProtocol | None = None  # nvfp4: scalar in the export dtype

    @property
    def axis(self) -> int:
        """K, the last axis: 1 for a linear [N, K], 2 for MoE experts [E, N, K]."""
        return self.codes.shape.rank() - 1

    @property
    def opset(self) -> int:
        return FP4_OPSET if self.codes.dtype == ir.DataType.FLOAT4E2M1 else DQ_OPSET


class DequantizeWeights(WeightRewrite):
    """`weights`: initializer name -> its codes and scales; every use of W reads the dequantized tensor instead
    (sliced back to K columns where K is not a whole number of blocks). Raises the default opset to 21 (23
    with nvfp4)."""

    def requires(self, model: ir.Model) -> None:
        for name in self.weights:
            self.initializer(model, name)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.replaced = 0
        first = graph.node(0) if len(graph) else None
        for name, q in self.weights.items():
            value = graph.initializers.pop(name)
            codes, scales = _initializer(graph, q.codes), _initializer(graph, q.scales)
            nodes = []
            if q.global_scale is not None:  # the E4M3 block scales, dequantized per tensor
                nodes.append(ir.node("DequantizeLinear", [scales, _initializer(graph, q.global_scale)]))
                scales = nodes[0].outputs[0]
                scales.shape, scales.type = q.scales.shape, ir.TensorType(q.global_scale.dtype)
            attributes = {"axis": q.axis, "block_size": q.block_size}
            nodes.append(ir.node("DequantizeLinear", [codes, scales], attributes))
            if q.codes.shape[q.axis] != q.k:
                bounds = [
                    _initializer(graph, _int64(f"{name}_{n}", v)) for n, v in _slice_bounds(q.k, q.axis)
                ]
                nodes.append(ir.node("Slice", [nodes[-1].outputs[0], *bounds]))
            for node in nodes:  # before every use: the top of the graph
                if first is not None:
                    graph.insert_before(first, node)
                else:
                    graph.append(node)
            out = nodes[-1].outputs[0]
            out.shape, out.type = value.shape, value.type
            ir.convenience.replace_all_uses_with(value, out, replace_graph_outputs=True)
            out.name = name
            self.replaced += 1
        if self.replaced:  # the model-local functions must import the model's version (ONNX checker rule)
            version = max(q.opset for q in self.weights.values())  # 20 -> 21 -> 23 added types, not semantics
            for opsets in (model.opset_imports, *(f.opset_imports for f in model.functions.values())):
                if opsets.get("", version) < version:
                    opsets[""] = version
        return ir.passes.PassResult(model, modified=self.replaced > 0)


def _slice_bounds(k: int, axis: int) -> list[tuple[str, int]]:
    return [("starts", 0), ("ends", k), ("axes", axis)]


def _int64(name: str, v: int) -> ir.TensorProtocol:
    return ir.tensor(np.array([v], dtype=np.int64), name=name)
