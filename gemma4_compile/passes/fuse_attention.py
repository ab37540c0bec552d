"""Fold standard-op attention (the vision tower's) into one ONNX `Attention` node (opset 23) for TensorRT.

vision.onnx writes each layer's attention as

    MatMul(q, Transpose(k, [0, 1, 3, 2])) -> [Cast fp32] -> Add(bias) -> Softmax(-1) -> [Cast] -> MatMul(., v)

so that every backend runs it. TensorRT runs that as generic layers, and on an H200 the form is 7.6-12.6x
slower than a fused attention kernel at 280 soft tokens per image and above (benchmarks/RESULTS.md,
`gpu_vision_attention.py`). TensorRT 10.14+ and TensorRT-RTX import opset-23 `Attention` as `IAttention`: a
fused kernel where one exists for the dtype and head dim, and, with `TRT_decomposable=1`, those same generic
layers where none does (fp32, for one), so the build never fails for want of a kernel.

The engine stage runs this pass; the exported file keeps the standard ops, because onnxruntime's CPU
`Attention` refuses a mask that broadcasts over the queries ([N, 1, 1, P]), and would need one of [N, 1, P, P].

Same math: Attention(q, k, v, attn_mask=bias, scale=1.0) = softmax(q k^T + bias) v, with the scores and the
softmax in fp32 inside the fused kernel as the graph's fp32 island had them; a half-precision graph's bias is
cast to the activations' dtype (its padded-key entries become -inf, which the softmax treats as the finite
large negative value did: no image has only padded keys). Only a chain whose intermediate values nothing else
reads is folded, so the rest of the graph is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from .fold_constants import is_standard

__all__ = ["ATTENTION_OPSET", "FuseAttention"]

ATTENTION_OPSET = 23  # ONNX Attention's first opset
_K_TRANSPOSE = [0, 1, 3, 2]


def _only_use(value: ir.Value) -> ir.Node | None:
    """The one node reading `value`, or None if it has several readers or is a graph output."""
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 and not value.is_graph_output() else None


def _skip_cast(value: ir.Value) -> tuple[ir.Node | None, ir.Node | None]:
    """(producer of value, the Cast in between) looking through at most one Cast read only by the chain."""
    node = value.producer()
    if is_standard(node, "Cast") and _only_use(node.outputs[0]) is not None:
        return node.inputs[0].producer(), node
    return node, None


def _rank4(value: ir.Value) -> bool:
    return value.shape is not None and len(value.shape) == 4


@dataclass(frozen=True)
class _Chain:
    scores: ir.Node  # MatMul(q, kT)
    k_transpose: ir.Node
    add: ir.Node
    bias: ir.Value
    softmax: ir.Node
    out: ir.Node  # MatMul(p, v)
    casts: tuple[ir.Node, ...]

    @property
    def nodes(self) -> list[ir.Node]:
        return [self.out, *self.casts, self.softmax, self.add, self.scores]


def _match(out: ir.Node) -> _Chain | None:
    """The attention chain ending at MatMul `out`, or None."""
    if not is_standard(out, "MatMul"):
        return None
    softmax, cast_p = _skip_cast(out.inputs[0])
    if not is_standard(softmax, "Softmax") or _only_use(softmax.outputs[0]) is None:
        return None
    axis = softmax.attributes.get("axis")
    if axis is not None and axis.as_int() not in (-1, 3):
        return None
    add = softmax.inputs[0].producer()
    if not is_standard(add, "Add") or _only_use(add.outputs[0]) is None:
        return None
    for i in (0, 1):
        scores, cast_s = _skip_cast(add.inputs[i])
        if not is_standard(scores, "MatMul") or _only_use(scores.outputs[0]) is None:
            continue
        kt = scores.inputs[1].producer()
        perm = kt.attributes.get("perm") if is_standard(kt, "Transpose") else None
        if perm is None or list(perm.as_ints()) != _K_TRANSPOSE:
            continue
        q, k, v = scores.inputs[0], kt.inputs[0], out.inputs[1]
        if not all(_rank4(x) for x in (q, k, v)) or q.dtype != v.dtype or q.dtype != k.dtype:
            continue
        casts = tuple(c for c in (cast_p, cast_s) if c is not None)
        return _Chain(scores, kt, add, add.inputs[1 - i], softmax, out, casts)
    return None


class FuseAttention(ir.passes.InPlacePass):
    """`fused` after a run: how many attention chains became one `Attention` node."""

    def __init__(self) -> None:
        super().__init__()
        self.fused = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.fused = 0
        for node in list(graph):
            chain = _match(node)
            if chain is not None:
                self._replace(graph, chain)
                self.fused += 1
        if self.fused:
            model.opset_imports[""] = max(model.opset_imports.get("", ATTENTION_OPSET), ATTENTION_OPSET)
        return ir.passes.PassResult(model, modified=self.fused > 0)

    @staticmethod
    def _replace(graph: ir.Graph, chain: _Chain) -> None:
        q, v = chain.scores.inputs[0], chain.out.inputs[1]
        bias, new = chain.bias, []
        if bias.dtype != q.dtype:
            cast = ir.node("Cast", [bias], attributes={"to": q.dtype}, name=f"{chain.add.name}_mask")
            new.append(cast)
            bias = cast.outputs[0]
        attention = ir.node(
            "Attention",
            [q, chain.k_transpose.inputs[0], v, bias],
            attributes={"scale": 1.0, "TRT_decomposable": 1},
            name=f"{chain.out.name}_attention",
        )
        new.append(attention)
        graph.insert_before(chain.out, new)
        old = chain.out.outputs[0]
        ir.convenience.replace_all_uses_with(old, attention.outputs[0], replace_graph_outputs=True)
        graph.remove(chain.nodes, safe=True)
        if not list(chain.k_transpose.outputs[0].uses()):
            graph.remove(chain.k_transpose, safe=True)
        attention.outputs[0].name = old.name
        attention.outputs[0].type, attention.outputs[0].shape = old.type, old.shape

    def ensures(self, model: ir.Model) -> None:
        left = [n.name for n in model.graph if _match(n) is not None]
        if left:
            raise ir.passes.PostconditionError(f"attention chains left unfused: {left[:3]}")
