"""For onnxruntime only: the decoder with its `gemma4::` bodies inlined and the per-layer mask and shape
arithmetic computed once per call.

onnxruntime inlines a model-local function once per call site, and each copy of the attention body reads its
shapes from its own tensors (`Shape(q)`, `Shape(past_k)`), so the mask (Range, Mod, Less, Where, And, Or over
positions) and the shape arithmetic are computed again in every layer: its common-subexpression pass cannot
merge copies whose inputs differ. Here the bodies are inlined first (onnx's inliner), shape inference names every
dimension, and each `Shape` read whose dimensions are all known (a number, or a symbol a graph input carries:
`batch`, `sequence`, `sliding_cache_len`, `cache_len` from export/io_spec.py) becomes a read of that graph
input (or a constant). Then the copies have the same inputs and common-subexpression elimination keeps one:
one mask per window value, one set of shape vectors per head layout. Only integer and boolean computations
are shared, and the only float ops removed are casts to the type their input already has, so the logits are
those of the plain graph. It relies on the graph inputs' dimension names being the contract export.json states
(every input's `sliding_cache_len` is the same size in one call), which the runners' caches always satisfy;
onnxruntime itself does not check it, so a caller feeding mismatched caches to a rewritten session would get
the first cache's length everywhere instead of an error.

Before inlining, each attention body's ring update gets onnxruntime's one-token form (a row scattered into the
cache copy instead of every slot rebuilt; the same values).

The exported file keeps its function (TensorRT maps it to a plugin or inlines it); this runs on the graph that
the onnxruntime runner hands its session (runners/ort.py), without the weights (they stay external).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import onnx_ir as ir
from onnx_ir.passes.common import CommonSubexpressionEliminationPass, RemoveUnusedNodesPass

from ..ops.attention import body as attention
from ..ops.moe import body as moe
from ..ops.onnx_domain import DOMAIN
from .fold_constants import STANDARD_DOMAINS

__all__ = ["DropNoOpCasts", "ShareShapeReads", "inlined_with_shapes", "ort_decoder_passes", "shared_decoder"]


Factor = tuple[ir.Value, int]  # (graph input, axis)
Piece = int | list[Factor]  # a known number, or the product of graph-input dimensions


def _symbol_sources(graph: ir.Graph) -> dict[str, Factor]:
    """Each symbolic dimension of the graph inputs -> the first (input, axis) that carries it."""
    sources: dict[str, Factor] = {}
    for value in graph.inputs:
        for axis, dim in enumerate(value.shape or ()):
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                sources.setdefault(dim.value, (value, axis))
    return sources


def _factors(dim: ir.SymbolicDim, sources: dict[str, Factor]) -> list[Factor] | None:
    """A symbol a graph input carries, or a product of them (onnx's data propagation writes `batch*sequence`
    for a flattened [B*S, H]); None when any part is unknown."""
    names = (dim.value or "").split("*")
    if not all(n in sources for n in names):
        return None
    return [sources[n] for n in names]


def _read_range(node: ir.Node, rank: int) -> range:
    """The axes a Shape node reads (its start / end attributes, negatives and clamping as the spec says)."""
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank)
    start, end = (min(max(a + rank if a < 0 else a, 0), rank) for a in (start, end))
    return range(start, end)


class ShareShapeReads(ir.passes.InPlacePass):
    """Replace `Shape` reads of known dimensions by reads of the graph input carrying them (or constants).

    Needs shapes on the values (`inlined_with_shapes`, or onnx-ir's ShapeInferencePass). `rewritten` after a
    run: the Shape nodes replaced.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rewritten = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        sources = _symbol_sources(graph)
        self.rewritten = 0
        for node in list(graph):
            pieces = self._pieces(node, sources)
            if pieces is None:
                continue
            new_nodes, out = self._build(node, pieces)
            graph.insert_before(node, new_nodes)
            old = node.outputs[0]
            ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            out.name, out.type, out.shape = old.name, old.type, old.shape
            self.rewritten += 1
        return ir.passes.PassResult(model, modified=self.rewritten > 0)

    @staticmethod
    def _pieces(node: ir.Node, sources: dict[str, Factor]) -> list[Piece] | None:
        """Per axis read: the number, or the (graph input, axis) with the same symbol; None to leave it."""
        if node.op_type != "Shape" or node.domain not in STANDARD_DOMAINS or node.inputs[0] is None:
            return None
        x = node.inputs[0]
        if x.shape is None:
            return None
        pieces: list[Piece] = []
        for axis in _read_range(node, len(x.shape)):
            dim = x.shape[axis]
            factors = dim if isinstance(dim, int) else _factors(dim, sources)
            if factors is None:
                return None
            pieces.append(factors)
        if len(pieces) == 1 and pieces[0] == [(x, _read_range(node, len(x.shape))[0])]:
            return None  # already a read of the graph input that names the dimension
        return pieces

    @staticmethod
    def _build(node: ir.Node, pieces: list[Piece]) -> tuple[list[ir.Node], ir.Value]:
        """Nodes computing the same int64 vector from the graph inputs; adjacent numbers become one constant."""
        nodes: list[ir.Node] = []
        parts: list[ir.Value] = []
        numbers: list[int] = []

        def flush() -> None:
            if numbers:
                const = ir.tensor(np.array(numbers, dtype=np.int64))
                nodes.append(ir.node("Constant", [], attributes={"value": const}))
                parts.append(nodes[-1].outputs[0])
                numbers.clear()

        for piece in pieces:
            if isinstance(piece, int):
                numbers.append(piece)
                continue
            flush()
            for i, (source, axis) in enumerate(piece):
                nodes.append(ir.node("Shape", [source], attributes={"start": axis, "end": axis + 1}))
                if i:
                    nodes.append(ir.node("Mul", [nodes[-2].outputs[0], nodes[-1].outputs[0]]))
            parts.append(nodes[-1].outputs[0])
        flush()
        if len(parts) == 1:
            return nodes, parts[0]
        nodes.append(ir.node("Concat", parts, attributes={"axis": 0}))
        return nodes, nodes[-1].outputs[0]


class DropNoOpCasts(ir.passes.InPlacePass):
    """Remove `Cast` / `CastLike` to the type their input already has (the body's fp32 softmax round trip in an
    fp32 export): onnxruntime runs each as a copy of the scores, once per layer. Needs dtypes on the values."""

    def __init__(self) -> None:
        super().__init__()
        self.removed = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.removed = 0
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):  # Loop bodies too (MoE experts)
            if not _is_no_op_cast(node) or node.outputs[0].is_graph_output():
                continue
            ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
            node.graph.remove(node, safe=True)
            self.removed += 1
        return ir.passes.PassResult(model, modified=self.removed > 0)


def _is_no_op_cast(node: ir.Node) -> bool:
    if node.domain not in STANDARD_DOMAINS or node.op_type not in ("Cast", "CastLike"):
        return False
    x = node.inputs[0]
    if x is None or x.dtype is None:
        return False
    if node.op_type == "CastLike":
        return node.inputs[1] is not None and node.inputs[1].dtype == x.dtype
    to = node.attributes.get_int("to")
    return to is not None and ir.DataType(to) == x.dtype


def ort_decoder_passes(fuse: bool = True, attention_kernel: bool = False) -> list[ir.passes.PassBase]:
    """On an inlined, shape-inferred graph: point Shape reads at the graph inputs, drop no-op casts, fuse
    RMSNorms and rotary embeddings where `fuse` (ort_fusions.py: the only rewrite here that changes float
    arithmetic, by an ulp), merge the copies, move each attention kernel's head norms and rotations into it where
    `fuse` and `attention_kernel` (ort_attention.py), drop what nothing reads."""
    fusions: list[ir.passes.PassBase] = []
    into_kernel: list[ir.passes.PassBase] = []
    if fuse:
        from .ort_fusions import FuseForOrt  # onnxscript's rewriter: imported by the starts that fuse

        fusions.append(FuseForOrt())
        if attention_kernel:
            from .ort_attention import FuseAttentionInputs

            into_kernel.append(FuseAttentionInputs())
    return [
        ShareShapeReads(),
        DropNoOpCasts(),
        *fusions,
        CommonSubexpressionEliminationPass(),
        *into_kernel,
        RemoveUnusedNodesPass(),
    ]


def inlined_with_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model-local functions inlined and every value's shape inferred (onnx's C++ inliner and inference:
    a fraction of a second where onnx-ir's InlinePass and ShapeInferencePass take seconds on a 12-layer graph).
    An op without inference (com.microsoft) only leaves the shapes after it open."""
    return onnx.shape_inference.infer_shapes(onnx.inliner.inline_local_functions(proto), data_prop=True)


def _import_kernel_domain(proto: onnx.ModelProto) -> None:
    if all(o.domain != moe.KERNEL_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(moe.KERNEL_DOMAIN, 1))


def shared_decoder(
    path: Path,
    fuse: bool = True,
    decode_ring: bool = True,
    moe_step: bool = False,
    attention_kernel: bool = False,
) -> bytes:
    """decoder.onnx at `path`, rewritten, serialized; its weights stay references into the export's data file
    (never read here), so the session needs the export folder for them. `decode_ring`: the attention bodies
    first get onnxruntime's one-token ring update (ops/attention/body.py `decode_ring`; same values).
    `moe_step`: the MoE bodies' calls of up to 16 tokens run our `gemma4_ort::MoEStep` kernel (ops/moe/body.py
    `step_kernel`) and 4-bit experts' If chains become `gemma4_ort::MoENBits` (moe_nbits.py `CollapseExperts`),
    for a session that registers runners/ort_kernels' library. `attention_kernel`: each layer's attention runs as
    one `gemma4_ort::SlidingWindowAttention` node of that library (ops/attention/body.py `kernel_nodes`), with
    `fuse` a `gemma4_ort::NormRopeAttention` that also norms and rotates the heads (ort_attention.py)."""
    from .moe_nbits import CollapseExperts
    from .run import run_passes

    proto = onnx.load(path, load_external_data=False)
    for i, function in enumerate(proto.functions):
        if function.domain != DOMAIN:
            continue
        if decode_ring and function.name == attention.OP_TYPE:
            proto.functions[i].CopyFrom(attention.decode_ring(function))
        if moe_step and function.name == moe.OP_TYPE:
            try:
                proto.functions[i].CopyFrom(moe.step_kernel(function, moe.STEP_MAX_TOKENS))
            except ValueError:  # an export from before BODY_SPLIT: its body runs as it is
                continue
            _import_kernel_domain(proto)
    if attention_kernel and attention.kernel_nodes(proto.graph):
        _import_kernel_domain(proto)
    kernels = [CollapseExperts(moe.KERNEL_DOMAIN)] if moe_step else []
    model = run_passes(
        ir.serde.deserialize_model(inlined_with_shapes(proto)),
        [*kernels, *ort_decoder_passes(fuse, attention_kernel)],
    )
    return ir.serde.serialize_model(model).SerializeToString()
