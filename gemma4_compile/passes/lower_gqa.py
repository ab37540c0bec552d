"""The `gqa` lowering (onnxruntime only): `gemma4::SlidingWindowAttention` runs through `com.microsoft.GroupQueryAttention`.

The custom nodes stay as they are (same inputs, outputs, ring-cache semantics, plugin attributes); the pass
swaps their model-local function for one that unrolls the ring into chronological order, hands it to
onnxruntime's fused GQA kernel (`local_window_size` = W keys including self, `do_rotary` off: RoPE is already
applied) and keeps our own ring update for the presents. Each node gains the per-layer GQA attributes
`num_heads`, `kv_num_heads`, `local_window_size`; TensorRT plugin creators ignore fields they do not name.

Limit (onnxruntime's GQA): a batch of more than one row cannot prefill several tokens on top of a non-empty
cache; prefill from an empty cache and one-token decode work at any batch. `OrtRunner` refuses that case.
A lowered export is for onnxruntime: TensorRT cannot inline GroupQueryAttention, use a plain export there.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from ..model.config import Gemma4Spec
from ..ops.attention import body as attention
from ..ops.onnx_domain import DOMAIN

__all__ = ["CONTRIB", "LowerAttentionToGQA", "gqa_function"]

CONTRIB = "com.microsoft"

# Unroll the ring into chronological order (oldest cached position first, L = min(past_len, C) valid),
# trimmed to the longest row so that a fresh cache is "no past" for GQA; positions are already in q/k.
GQA_ATTEND = """
  Lb = Min (pl_col, C1)
  start = Sub (pl_col, Lb)
  chron = Add (start, j_row)
  slot = Mod (chron, C)
  slot4 = Reshape (slot, idx_shape)
  slot_b = Expand (slot4, pshape)
  ukf = GatherElements <axis = 2> (past_k, slot_b)
  uvf = GatherElements <axis = 2> (past_v, slot_b)
  maxL = ReduceMax <keepdims = 1> (Lb)
  maxL1 = Reshape (maxL, one1)
  zero1 = Constant <value_ints: ints = [0]> ()
  uk = Slice (ukf, zero1, maxL1, ax2)
  uv = Slice (uvf, zero1, maxL1, ax2)
  qt = Transpose <perm = [0, 2, 1, 3]> (q)
  kt = Transpose <perm = [0, 2, 1, 3]> (k)
  vt = Transpose <perm = [0, 2, 1, 3]> (v)
  flat = Constant <value_ints: ints = [0, 0, -1]> ()
  q3 = Reshape (qt, flat)
  k3 = Reshape (kt, flat)
  v3 = Reshape (vt, flat)
  Lflat = Squeeze (Lb, ax1)
  tot = Add (Lflat, S)
  seqk64 = Sub (tot, one)
  seqk = Cast <to = 6> (seqk64)
  maxLs = Squeeze (maxL1)
  CS = Add (maxLs, S)
  total_len = Cast <to = 6> (CS)
  o3, pk_unused, pv_unused = com.microsoft.GroupQueryAttention <num_heads: int = @num_heads, kv_num_heads: int = @kv_num_heads, scale: float = @scale, local_window_size: int = @local_window_size> (q3, k3, v3, uk, uv, seqk, total_len)
  qshape_t = Shape (qt)
  o4 = Reshape (o3, qshape_t)
  out = Transpose <perm = [0, 2, 1, 3]> (o4)
"""


def gqa_function() -> onnx.FunctionProto:
    text = attention.body(
        GQA_ATTEND,
        attrs="window, scale, num_heads, kv_num_heads, local_window_size",
        opsets=f'"" : 20, "{CONTRIB}" : 1',
    )
    return onnx.parser.parse_function(text)


def _attention_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.domain == DOMAIN and n.op_type == attention.OP_TYPE]


class LowerAttentionToGQA(ir.passes.InPlacePass):
    """Give every attention node its layer's GQA attributes and swap in the GQA function body."""

    def __init__(self, spec: Gemma4Spec) -> None:
        super().__init__()
        self.spec = spec

    def requires(self, model: ir.Model) -> None:
        found = len(_attention_nodes(model))
        if found != self.spec.num_hidden_layers:
            raise ir.passes.PreconditionError(f"expected one attention node per layer, found {found}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for node, plan in zip(_attention_nodes(model), self.spec.layers):  # nodes are in layer order
            node.attributes["num_heads"] = ir.AttrInt64("num_heads", self.spec.num_attention_heads)
            node.attributes["kv_num_heads"] = ir.AttrInt64("kv_num_heads", plan.num_kv_heads)
            window = plan.window if plan.window > 0 else -1
            node.attributes["local_window_size"] = ir.AttrInt64("local_window_size", window)
        function = ir.serde.deserialize_function(gqa_function())
        model.functions.pop(function.identifier(), None)
        model.functions[function.identifier()] = function
        model.opset_imports.setdefault(CONTRIB, 1)
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        nodes = _attention_nodes(model)
        if not all("local_window_size" in n.attributes for n in nodes):
            raise ir.passes.PostconditionError("an attention node lacks the GQA attributes")
