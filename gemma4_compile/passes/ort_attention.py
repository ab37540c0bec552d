"""For onnxruntime only: each layer's attention kernel takes its query / key / value heads before the norms and
rotary embeddings, as one `gemma4_ort::NormRopeAttention` node (runners/ort_kernels attention.cc).

Runs on the inlined decoder after ort_fusions.py and common-subexpression elimination, where each head reaches
`gemma4_ort::SlidingWindowAttention` (ops/attention/body.py `kernel_nodes`) through

    q:    Reshape [B, S, Hq, D] -> SimplifiedLayerNormalization(w_q) -> Transpose(0, 2, 1, 3) -> RotaryEmbedding
    k:    Reshape [B, S, Hkv, D] -> SimplifiedLayerNormalization(w_k) -> Transpose -> RotaryEmbedding
    v:    Reshape -> SimplifiedLayerNormalization(ones) -> Transpose           (K = V layers: k's Reshape)
    out:  Transpose(0, 2, 1, 3) -> Reshape [B, S, Hq * D]

and the rotations of q and k read the same position ids and cos / sin tables. Those nine nodes per layer (two
norms, three transposes and two rotations around the kernel, at one token a few microseconds of work each) move
into the kernel, which norms and rotates the heads as those onnxruntime kernels do (fp32 statistics,
non-interleaved halves). Layers that read another layer's cache (KV sharing) get k / v as they are (`kv_raw` 0);
their query still fuses. The Reshapes stay (onnxruntime runs them as views). A layer whose pattern differs in any
part keeps its nodes.
"""

from __future__ import annotations

import onnx_ir as ir

from ..ops.contract import KERNEL_DOMAIN
from .fold_constants import STANDARD_DOMAINS

__all__ = ["FuseAttentionInputs"]

MS_DOMAIN = "com.microsoft"
HEADS_FIRST = [0, 2, 1, 3]


def _only_use(value: ir.Value) -> ir.Node | None:
    """The one node reading `value`, if exactly one does and it is not a graph output."""
    consumers = list(value.consumers())
    if len(consumers) != 1 or value.is_graph_output() or len(value.uses()) != 1:
        return None
    return consumers[0]


def _made_by(
    value: ir.Value | None, op_type: str, domains: tuple[str, ...] = STANDARD_DOMAINS
) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain in domains else None


def _constant(value: ir.Value | None) -> bool:
    """A weight or a Constant's output (never read here: weights stay in the export's data file)."""
    producer = value.producer() if value is not None else None
    return value is not None and (
        value.const_value is not None or (producer and producer.op_type == "Constant")
    )


def _transpose_heads(node: ir.Node | None) -> bool:
    return node is not None and list(node.attributes.get_ints("perm", [])) == HEADS_FIRST


class _Heads:
    """One head input's chain: Reshape -> norm (-> Transpose -> rotation, or just the Transpose for v)."""

    def __init__(self, reshape: ir.Node, norm: ir.Node, nodes: list[ir.Node], rotary: ir.Node | None):
        self.reshape, self.norm, self.nodes, self.rotary = reshape, norm, nodes, rotary

    @property
    def heads(self) -> ir.Value:
        return self.reshape.outputs[0]

    @property
    def weight(self) -> ir.Value:
        return self.norm.inputs[1]

    @property
    def epsilon(self) -> float:
        return self.norm.attributes.get_float("epsilon", 1e-5)


def _heads(value: ir.Value, rotated: bool, shared_reshape: bool = False) -> _Heads | None:
    """The chain ending in `value`, each intermediate read only by the next node; None when it differs."""
    rotary = _made_by(value, "RotaryEmbedding", (MS_DOMAIN,)) if rotated else None
    if rotated and (rotary is None or not _plain_rotary(rotary)):
        return None
    transposed = rotary.inputs[0] if rotary is not None else value
    transpose = _made_by(transposed, "Transpose")
    if not _transpose_heads(transpose) or (rotary is not None and _only_use(transposed) is not rotary):
        return None
    norm = _made_by(transpose.inputs[0], "SimplifiedLayerNormalization")
    if norm is None or _only_use(norm.outputs[0]) is not transpose or not _plain_norm(norm):
        return None
    reshape = _made_by(norm.inputs[0], "Reshape")
    if reshape is None or (not shared_reshape and _only_use(reshape.outputs[0]) is not norm):
        return None
    nodes = [norm, transpose, *([rotary] if rotary is not None else [])]
    return _Heads(reshape, norm, nodes, rotary)


def _plain_rotary(node: ir.Node) -> bool:
    """com.microsoft.RotaryEmbedding over the whole head, halves not interleaved, unscaled (ort_fusions.py's)."""
    a = node.attributes
    return (
        a.get_int("interleaved", 0) == 0
        and a.get_int("rotary_embedding_dim", 0) == 0
        and a.get_int("num_heads", 0) == 0
        and a.get_float("scale", 1.0) == 1.0
        and len(node.inputs) == 4
        and len(node.outputs) == 1
    )


def _plain_norm(node: ir.Node) -> bool:
    """A last-axis SimplifiedLayerNormalization with float statistics, its scale a constant, one output."""
    a = node.attributes
    axis_ok = a.get_int("axis", -1) in (-1, 3)
    used = [o for o in node.outputs[1:] if o is not None and o.uses()]
    return axis_ok and a.get_int("stash_type", 1) == 1 and _constant(node.inputs[1]) and not used


def _four_dims(value: ir.Value) -> bool:
    """[B, S, H, D], or a shape inference could not tell (the kernel checks it on every call)."""
    return value.shape is None or len(value.shape) == 4


def _output_chain(out: ir.Value) -> ir.Node | None:
    """The Transpose(0, 2, 1, 3) that alone reads the kernel's output, if it does."""
    transpose = _only_use(out)
    if transpose is None or transpose.op_type != "Transpose" or transpose.domain not in STANDARD_DOMAINS:
        return None
    return transpose if _transpose_heads(transpose) else None


class FuseAttentionInputs(ir.passes.InPlacePass):
    """Replace each matching `gemma4_ort::SlidingWindowAttention` and its input / output chains by one
    `gemma4_ort::NormRopeAttention`; `fused` after a run: how many layers, `kv_raw`: how many of them took
    their keys and values raw."""

    def __init__(self) -> None:
        super().__init__()
        self.fused = self.kv_raw = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.fused = self.kv_raw = 0
        graph = model.graph
        for node in list(graph):
            if node.domain == KERNEL_DOMAIN and node.op_type == "SlidingWindowAttention":
                self._fuse(graph, node)
        return ir.passes.PassResult(model, modified=self.fused > 0)

    def _fuse(self, graph: ir.Graph, node: ir.Node) -> None:
        q = _heads(node.inputs[0], rotated=True) if _only_use(node.inputs[0]) is node else None
        transpose_out = _output_chain(node.outputs[0])
        if q is None or transpose_out is None or not _four_dims(q.heads):
            return
        k = _heads(node.inputs[1], rotated=True, shared_reshape=True)
        v = _heads(node.inputs[2], rotated=False, shared_reshape=True)
        kv_raw = all(_only_use(x) is node for x in node.inputs[1:3]) and self._kv_raw(q, k, v)
        if kv_raw:
            assert k is not None and v is not None
            k_in, v_in, k_weight, v_weight = k.heads, v.heads, k.weight, v.weight
        else:  # keys / values as the kernel gets them today; the weights are unused placeholders
            k_in, v_in, k_weight, v_weight = node.inputs[1], node.inputs[2], q.weight, q.weight
        ids, cos, sin = q.rotary.inputs[1:4]
        blocks = list(node.inputs[7:8])
        fused = ir.node(
            "NormRopeAttention",
            [q.heads, k_in, v_in, *node.inputs[3:7], q.weight, k_weight, v_weight, ids, cos, sin, *blocks],
            attributes={
                "window": node.attributes.get_int("window", 0),
                "scale": node.attributes.get_float("scale", 1.0),
                "epsilon": q.epsilon,
                "kv_raw": int(kv_raw),
            },
            domain=KERNEL_DOMAIN,
            num_outputs=len(node.outputs),
        )
        graph.insert_before(node, fused)
        ir.convenience.replace_all_uses_with(transpose_out.outputs[0], fused.outputs[0])
        for old, new in zip(node.outputs[1:], fused.outputs[1:]):
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        names = [o.name for o in node.outputs]
        dead = [transpose_out, node, *q.nodes, *((k.nodes + v.nodes) if kv_raw else [])]
        graph.remove(dead, safe=True)
        for new, name in zip(fused.outputs, names):  # the caches keep their graph output names
            new.name = name
        self.fused += 1
        self.kv_raw += int(kv_raw)

    @staticmethod
    def _kv_raw(q: _Heads, k: _Heads | None, v: _Heads | None) -> bool:
        """k and v fuse too: their chains match, read nothing else, and share q's rotation and epsilon."""
        if k is None or v is None or k.rotary is None or q.rotary is None:
            return False
        if list(k.rotary.inputs[1:4]) != list(q.rotary.inputs[1:4]):
            return False
        if k.epsilon != q.epsilon or v.epsilon != q.epsilon:
            return False
        readers = {id(n) for n in (k.norm, v.norm)}
        return all(
            {id(c) for c in h.heads.consumers()} <= readers and not h.heads.is_graph_output() for h in (k, v)
        )
