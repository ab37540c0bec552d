"""Optional onnxruntime lowering: `gemma4::SlidingWindowAttention` runs through `com.microsoft.GroupQueryAttention`.

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

from ..model.config import Gemma4Spec
from .custom_ops import attention

LOWERINGS = ("gqa",)
CONTRIB = "com.microsoft"

GQA_BODY = """
<domain: "gemma4", opset_import: ["" : 20, "com.microsoft" : 1]>
SlidingWindowAttention <window, scale, num_heads, kv_num_heads, local_window_size> (q, k, v, past_k, past_v, past_len, seq_len) => (out, present_k, present_v)
{
  zero = Constant <value_int: int = 0> ()
  one = Constant <value_int: int = 1> ()
  one1 = Constant <value_ints: ints = [1]> ()
  ax0 = Constant <value_ints: ints = [0]> ()
  ax1 = Constant <value_ints: ints = [1]> ()
  B1 = Shape <start = 0, end = 1> (q)
  S1 = Shape <start = 2, end = 3> (q)
  C1 = Shape <start = 2, end = 3> (past_k)
  S = Squeeze (S1)
  C = Squeeze (C1)
  j = Range (zero, C, one)
  j_row = Unsqueeze (j, ax0)
  pl_col = Unsqueeze (past_len, ax1)
  Lb = Min (pl_col, C1)
  start = Sub (pl_col, Lb)
  chron = Add (start, j_row)
  slot = Mod (chron, C)
  idx_shape = Concat <axis = 0> (B1, one1, C1, one1)
  slot4 = Reshape (slot, idx_shape)
  pshape = Shape (past_k)
  slot_b = Expand (slot4, pshape)
  ukf = GatherElements <axis = 2> (past_k, slot_b)
  uvf = GatherElements <axis = 2> (past_v, slot_b)
  maxL = ReduceMax <keepdims = 1> (Lb)
  maxL1 = Reshape (maxL, one1)
  zero1 = Constant <value_ints: ints = [0]> ()
  ax2 = Constant <value_ints: ints = [2]> ()
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
  total = Cast <to = 6> (CS)
  o3, pk_unused, pv_unused = com.microsoft.GroupQueryAttention <num_heads: int = @num_heads, kv_num_heads: int = @kv_num_heads, scale: float = @scale, local_window_size: int = @local_window_size> (q3, k3, v3, uk, uv, seqk, total)
  qshape_t = Shape (qt)
  o4 = Reshape (o3, qshape_t)
  out = Transpose <perm = [0, 2, 1, 3]> (o4)
  total_len = Add (past_len, seq_len)
  tcol = Unsqueeze (total_len, ax1)
  tlast = Sub (tcol, one)
  tback = Sub (tlast, j_row)
  tmod = Mod (tback, C)
  new_pos = Sub (tlast, tmod)
  take = GreaterOrEqual (new_pos, pl_col)
  rel = Sub (new_pos, pl_col)
  Sm1 = Sub (S, one)
  src = Clip (rel, zero, Sm1)
  src4 = Reshape (src, idx_shape)
  src_b = Expand (src4, pshape)
  gk = GatherElements <axis = 2> (k, src_b)
  gv = GatherElements <axis = 2> (v, src_b)
  take4 = Reshape (take, idx_shape)
  present_k = Where (take4, gk, past_k)
  present_v = Where (take4, gv, past_v)
}
"""


def gqa_function() -> onnx.FunctionProto:
    return onnx.parser.parse_function(GQA_BODY)


def lower_attention_to_gqa(model: onnx.ModelProto, spec: Gemma4Spec) -> int:
    """Rewrite `model` in place; returns the number of attention nodes lowered."""
    nodes = [n for n in model.graph.node if n.domain == "gemma4" and n.op_type == attention.OP_TYPE]
    if len(nodes) != spec.num_hidden_layers:
        raise ValueError(f"expected one attention node per layer, found {len(nodes)}")
    for node, plan in zip(nodes, spec.layers):  # nodes are in layer order
        node.attribute.extend([
            onnx.helper.make_attribute("num_heads", spec.num_attention_heads),
            onnx.helper.make_attribute("kv_num_heads", plan.num_kv_heads),
            onnx.helper.make_attribute("local_window_size", plan.window if plan.window > 0 else -1),
        ])  # fmt: skip
    kept = [f for f in model.functions if not (f.domain == "gemma4" and f.name == attention.OP_TYPE)]
    del model.functions[:]
    model.functions.extend([*kept, gqa_function()])
    if not any(o.domain == CONTRIB for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(CONTRIB, 1))
    return len(nodes)
