"""QuantizeExperts: a `gemma4::MoE` node whose experts are quantized becomes onnxruntime's form of the same math,
one `If` per expert holding that expert's two `com.microsoft.MatMulNBits` (fp32 exports, onnxruntime only).

Why not MatMulNBits inside the MoE function's Loop: onnxruntime prepacks a MatMulNBits weight only when it is a
constant initializer at most one subgraph level away. An expert picked by index (`Gather(codes, e)`) is not
constant, and its MatMulNBits falls back to dequantizing the whole matrix per call (~30x slower than the
prepacked GEMV, measured on onnxruntime 1.31); nested Ifs (a tree over the expert id) lose the prepacking too.
So each expert e is a top-level `If(some token picked e)` whose branch reads its own codes and scales, stored as
views (offsets) into the stacked [E, N, blocks, blob] tensor the weight writer wrote: no byte is duplicated.

Semantics are BODY's (ops/moe/body.py): softmax over all E experts, top-k, renormalize, x per_expert_scale, then
per picked expert in ascending id order GELU-tanh(gate) * up, down, weighted, scatter-added into an fp32
accumulator. A step runs the branches of the experts some token picked; the others cost one `If` each.

CollapseExperts undoes it for the onnxruntime runner where our CPU kernels are loaded (runners/ort_kernels): a
chain of 4-bit experts becomes one `gemma4_ort::MoENBits` node over the same bytes, the chain's per-step cost
gone (decode 1.4-1.9x faster on the mid MoE config, benchmarks/RESULTS.md). The exported file keeps the chain.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..errors import ExportError
from .quantize_matmul import MS_DOMAIN, NBitsWeight, WeightRewrite, nbits_matmul, nbits_operands

__all__ = ["CollapseExperts", "QuantizeExperts"]

GATE_UP, DOWN = 3, 4  # gemma4::MoE inputs (ops/moe CONTRACT)


class QuantizeExperts(WeightRewrite):
    """`weights`: expert initializer name ([E, N, K] float) -> its MatMulNBits form with leading dims (E, N).
    Every `gemma4::MoE` node reading them is rewritten; both of a node's expert tensors must be quantized."""

    def requires(self, model: ir.Model) -> None:
        for name in self.weights:
            for use in self.initializer(model, name).uses():
                if use.node.op_type != "MoE" or use.idx not in (GATE_UP, DOWN):
                    raise ir.passes.PreconditionError(
                        f"quantized experts '{name}' feed {use.node.op_type} ({use.node.name}); only MoE reads them"
                    )
                other = use.node.inputs[DOWN if use.idx == GATE_UP else GATE_UP]
                if other is None or other.name not in self.weights:
                    raise ExportError(
                        f"MoE node {use.node.name}: gate_up and down experts must both be quantized for onnxruntime"
                    )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.replaced = 0
        nodes = [n for n in graph if n.op_type == "MoE" and n.inputs[GATE_UP].name in self.weights]
        for node in nodes:
            gate_up, down = (self.weights[node.inputs[i].name] for i in (GATE_UP, DOWN))
            _expand(graph, node, _Experts(graph, gate_up), _Experts(graph, down))
            self.replaced += 1
        for name in self.weights:
            graph.initializers.pop(name)
        if self.replaced:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=self.replaced > 0)

    def ensures(self, model: ir.Model) -> None:
        left = [n.name for n in model.graph if n.op_type == "MoE" and n.inputs[GATE_UP].name in self.weights]
        if left:
            raise ir.passes.PostconditionError(f"MoE nodes left with quantized experts: {left}")


class _Experts:
    """One stacked expert weight as E per-expert (codes, scales) initializers and their MatMulNBits operands;
    `prep`: the nodes computing those operands (a split 8-bit weight's; top level, where they fold)."""

    def __init__(self, graph: ir.Graph, q: NBitsWeight) -> None:
        self.q, self.count = q, q.b.shape[0]
        self.prep: list[ir.Node] = []
        self.operands = []
        for e in range(self.count):
            codes, scales = (_register(graph, _view(t, e, self.count)) for t in (q.b, q.scales))
            prep, operands = nbits_operands(codes, scales, q)
            self.prep += prep
            self.operands.append(operands)

    def matmul(self, x: ir.Value, e: int) -> list[ir.Node]:
        """Expert e's x @ W.T ([tokens, K] x): its MatMulNBits (or the split 8-bit form's nodes), result last."""
        return nbits_matmul(x, self.operands[e], self.q, rank=2)


def _view(t: ir.TensorProtocol, e: int, count: int) -> ir.ExternalTensor:
    """Expert e of a stacked external tensor: the same file, its e-th equal slice of the bytes."""
    if not isinstance(t, ir.ExternalTensor) or t.length % count:
        raise ExportError(f"quantized experts '{t.name}' are not a stacked external tensor")
    step = t.length // count
    stem, _, suffix = t.name.rpartition("_")
    return ir.ExternalTensor(
        t.location,
        t.offset + e * step,
        step,
        t.dtype,
        shape=ir.Shape(t.shape[1:]),
        name=f"{stem}.{e}_{suffix}",
        base_dir=t.base_dir,
    )


def _register(graph: ir.Graph, t: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(name=t.name, shape=t.shape, type=ir.TensorType(t.dtype), const_value=t)
    graph.register_initializer(value)
    return value


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A small initializer shared by every MoE node (created once)."""
    if name not in graph.initializers:
        _register(graph, ir.tensor(array, name=name))
    return graph.initializers[name]


def _expand(graph: ir.Graph, moe: ir.Node, gate_up: _Experts, down: _Experts) -> None:
    x, logits, per_expert_scale = moe.inputs[:3]
    count, top_k = gate_up.count, moe.attributes["top_k"].as_int()
    c = _Consts(graph, count, top_k)
    nodes: list[ir.Node] = [*gate_up.prep, *down.prep]

    def add(op: str, inputs, attributes=None, num_outputs: int = 1) -> ir.Value | tuple[ir.Value, ...]:
        node = ir.node(op, inputs, attributes=attributes or {}, num_outputs=num_outputs)
        nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else tuple(node.outputs)

    probs = add("Softmax", [logits], {"axis": -1})
    w0, idx = add("TopK", [probs, c.k], {"axis": -1}, num_outputs=2)
    w1 = add("Div", [w0, add("ReduceSum", [w0, c.last], {"keepdims": 1})])
    weights = add("Mul", [w1, add("Gather", [per_expert_scale, idx])])
    picked = add("ReduceMax", [add("OneHot", [idx, c.depth, c.off_on]), c.axes01], {"keepdims": 0})
    hits = add("Split", [add("Cast", [picked], {"to": ir.DataType.BOOL})], {"num_outputs": count}, count)
    acc = add("ConstantOfShape", [add("Shape", [x])], {"value": ir.tensor(np.zeros(1, np.float32))})
    for e in range(count):
        keep = ir.node("Identity", [acc])
        branches = {
            "then_branch": _expert_branch(e, x, idx, weights, acc, gate_up, down, c),
            "else_branch": ir.Graph([], keep.outputs, nodes=[keep], name=f"skip{e}"),
        }
        acc = add("If", [hits[e]], branches)
    _name_nodes(moe, nodes)
    graph.insert_before(moe, nodes)
    old = moe.outputs[0]
    acc.shape, acc.type = old.shape, old.type
    ir.convenience.replace_all_uses_with(old, acc, replace_graph_outputs=True)
    name = old.name
    graph.remove(moe, safe=True)
    acc.name = name


class _Consts:
    """The constants the expansion reads (outer-scope initializers of the branches)."""

    def __init__(self, graph: ir.Graph, count: int, top_k: int) -> None:
        i64 = np.int64
        self.k = _constant(graph, f"moe_nbits_top{top_k}", np.array([top_k], i64))
        self.last = _constant(graph, "moe_nbits_last", np.array([-1], i64))
        self.axes01 = _constant(graph, "moe_nbits_axes01", np.array([0, 1], i64))
        self.axis1 = _constant(graph, "moe_nbits_axis1", np.array([1], i64))
        self.depth = _constant(graph, f"moe_nbits_depth{count}", np.array(count, i64))
        self.off_on = _constant(graph, "moe_nbits_off_on", np.array([0, 1], np.float32))
        self.first = _constant(graph, "moe_nbits_first", np.array(0, i64))
        self.ids = [_constant(graph, f"moe_nbits_e{e}", np.array(e, i64)) for e in range(count)]


def _expert_branch(e: int, x, idx, weights, acc, gate_up: _Experts, down: _Experts, c: _Consts) -> ir.Graph:
    """acc + expert e's weighted rows for the tokens that picked it (BODY's loop body with e fixed)."""
    nodes: list[ir.Node] = []

    def add(node: ir.Node | list[ir.Node]) -> ir.Value | tuple[ir.Value, ...]:
        nodes.extend(node if isinstance(node, list) else [node])
        last = nodes[-1]
        return last.outputs[0] if len(last.outputs) == 1 else tuple(last.outputs)

    pairs = add(ir.node("NonZero", [add(ir.node("Equal", [idx, c.ids[e]]))]))
    tok = add(ir.node("Gather", [pairs, c.first], attributes={"axis": 0}))
    h = add(gate_up.matmul(add(ir.node("Gather", [x, tok], attributes={"axis": 0})), e))
    gate, up = add(ir.node("Split", [h], attributes={"axis": -1, "num_outputs": 2}, num_outputs=2))
    act = add(ir.node("Gelu", [gate], attributes={"approximate": "tanh"}))
    y = add(down.matmul(add(ir.node("Mul", [act, up])), e))
    pair_weights = add(
        ir.node("GatherND", [weights, add(ir.node("Transpose", [pairs], attributes={"perm": [1, 0]}))])
    )
    rows = add(ir.node("Mul", [y, add(ir.node("Unsqueeze", [pair_weights, c.axis1]))]))
    tok1 = add(ir.node("Unsqueeze", [tok, c.axis1]))
    out = add(ir.node("ScatterND", [acc, tok1, rows], attributes={"reduction": "add"}))
    return ir.Graph([], [out], nodes=nodes, name=f"expert{e}")


def _name_nodes(moe: ir.Node, nodes: list[ir.Node]) -> None:
    """Node and value names under the MoE node's, so the expansion of each layer reads as that layer's."""
    base = moe.name or f"moe_{moe.outputs[0].name}"
    for i, node in enumerate(nodes):
        node.name = f"{base}/{node.op_type}_{i}"
        for j, out in enumerate(node.outputs):
            out.name = f"{base}/{node.op_type}_{i}_{j}"
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                _name_subgraph(node.name, attr.as_graph())


def _name_subgraph(base: str, graph: ir.Graph) -> None:
    for i, node in enumerate(graph):
        node.name = f"{base}/{graph.name or 'branch'}/{node.op_type}_{i}"
        for j, out in enumerate(node.outputs):
            out.name = f"{node.name}_{j}"


class CollapseExperts(ir.passes.InPlacePass):
    """The inverse of QuantizeExperts for onnxruntime sessions that load runners/ort_kernels: each chain of
    per-expert Ifs whose experts are plain 4-bit MatMulNBits becomes one `gemma4_ort::MoENBits` node reading the
    stacked codes and scales where the writer put them (one external view over the E per-expert views: no byte
    is duplicated). Same routing and ascending-expert accumulation; the If chain's per-step cost (one If per
    expert, ~14 nodes per picked one) goes. Chains of split 8-bit experts stay. `collapsed`: how many."""

    def __init__(self, domain: str) -> None:
        super().__init__()
        self.domain = domain
        self.collapsed = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.collapsed = 0
        for chain in _chains(graph):
            node = _kernel_node(graph, chain, self.domain)
            if node is None:
                continue
            last = chain[-1].outputs[0]
            graph.insert_before(chain[0], node)
            node.outputs[0].shape, node.outputs[0].type = last.shape, last.type
            ir.convenience.replace_all_uses_with(last, node.outputs[0], replace_graph_outputs=True)
            name = last.name
            for n in chain:
                _detach_branches(n)
            graph.remove(chain, safe=True)
            node.outputs[0].name = name
            self.collapsed += 1
        if self.collapsed:
            model.opset_imports.setdefault(self.domain, 1)
        return ir.passes.PassResult(model, modified=self.collapsed > 0)


def _detach_branches(node: ir.Node) -> None:
    """Drop the reads of an If's branches, outer values included, so that what only they read becomes unused."""
    for name in ("then_branch", "else_branch"):
        for inner in node.attributes[name].as_graph():
            for i in range(len(inner.inputs)):
                inner.replace_input_with(i, None)


def _then(node: ir.Node) -> ir.Graph:
    return node.attributes["then_branch"].as_graph()


def _chains(graph: ir.Graph) -> list[list[ir.Node]]:
    """QuantizeExperts' If chains, each in expert order: If e's else branch passes on If e-1's output."""
    ifs = {n.outputs[0]: n for n in graph if n.op_type == "If" and (_then(n).name or "").startswith("expert")}
    following = {}
    for node in ifs.values():
        skip = node.attributes["else_branch"].as_graph()
        if len(skip) == 1 and skip.node(0).op_type == "Identity" and skip.node(0).inputs[0] in ifs:
            following[ifs[skip.node(0).inputs[0]]] = node
    chains = []
    for node in ifs.values():
        if _then(node).name != "expert0":
            continue
        chain = [node]
        while chain[-1] in following:
            chain.append(following[chain[-1]])
        if [_then(n).name for n in chain] == [f"expert{e}" for e in range(len(chain))]:
            chains.append(chain)
    return chains


def _kernel_node(graph: ir.Graph, chain: list[ir.Node], domain: str) -> ir.Node | None:
    """The MoENBits node for a chain, or None where its experts are not plain 4-bit codes in blocks of 32, 64, ..."""
    branches = [_then(n) for n in chain]
    matmuls = [[n for n in b if n.op_type == "MatMulNBits"] for b in branches]  # gate_up's, then down's
    if any(len(m) != 2 or any(len(n.inputs) != 3 for n in m) for m in matmuls):
        return None
    keys = ("bits", "block_size", "accuracy_level")
    gate_up, down = ({k: n.attributes[k].as_int() for k in keys} for n in matmuls[0])
    block = gate_up["block_size"]
    if any(gate_up[k] != down[k] for k in keys) or gate_up["bits"] != 4 or block < 32 or block & (block - 1):
        return None
    routing = _routing(branches[0], matmuls[0][0])
    views = [[m[i].inputs[j] for m in matmuls] for i in (0, 1) for j in (1, 2)]
    if routing is None or not all(_contiguous(v) for v in views):
        return None
    stacked = [_stacked(graph, v) for v in views]
    x, logits, per_expert_scale, top_k = routing
    attributes = {
        "top_k": top_k,
        "block_size": block,
        "accuracy_level": gate_up["accuracy_level"],
    }
    return ir.node("MoENBits", [x, logits, per_expert_scale, *stacked], attributes, domain=domain)


def _routing(branch: ir.Graph, gate_up: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value, int] | None:
    """(x, router logits, per_expert_scale, top_k) that an expert branch of _expand reads, or None."""
    picked = gate_up.inputs[0].producer()  # Gather(x, tokens)
    weights = next((n.inputs[0] for n in branch if n.op_type == "GatherND"), None)
    equal = next((n for n in branch if n.op_type == "Equal"), None)
    topk = equal.inputs[0].producer() if equal is not None else None
    if picked is None or weights is None or topk is None or topk.op_type != "TopK":
        return None
    softmax = topk.inputs[0].producer()
    gathers = [v.producer() for v in weights.producer().inputs if v.producer() is not None]
    scale = next((n.inputs[0] for n in gathers if n.op_type == "Gather"), None)
    k = topk.inputs[1].const_value
    if softmax is None or softmax.op_type != "Softmax" or scale is None or k is None:
        return None
    return picked.inputs[0], softmax.inputs[0], scale, int(k.numpy().reshape(-1)[0])


def _contiguous(views: list[ir.Value]) -> bool:
    """Per-expert views (_view's) that lie back to back in one file, expert by expert."""
    tensors = [v.const_value for v in views]
    if not all(isinstance(t, ir.ExternalTensor) for t in tensors):
        return False
    first, step = tensors[0], tensors[0].length
    where = (first.location, first.base_dir, first.dtype, step)
    return all(
        (t.location, t.base_dir, t.dtype, t.length) == where and t.offset == first.offset + e * step
        for e, t in enumerate(tensors)
    )


def _stacked(graph: ir.Graph, views: list[ir.Value]) -> ir.Value:
    """One initializer over contiguous per-expert views: [E, *view shape], the same bytes."""
    first = views[0].const_value
    stem, _, suffix = views[0].name.rpartition("_")
    name = f"{stem.removesuffix('.0')}_{suffix}"
    if name in graph.initializers:
        name += ".stacked"
    tensor = ir.ExternalTensor(
        first.location,
        first.offset,
        first.length * len(views),
        first.dtype,
        shape=ir.Shape([len(views), *first.shape]),
        name=name,
        base_dir=first.base_dir,
    )
    return _register(graph, tensor)
