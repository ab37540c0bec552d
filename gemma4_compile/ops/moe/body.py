"""`gemma4::MoE`: routing (softmax over all experts, top-k, renormalize, x per_expert_scale) + GELU-tanh experts.

Semantics: `gemma4_compile.model.ops.moe`. The body gathers the selected experts' weights per token, which
costs T*K*2I*H scratch: fine for validation-sized graphs, the TensorRT plugin does the real grouped GEMM.
"""

from __future__ import annotations

import onnx

from ..onnx_domain import register_schema
from . import MOE

CONTRACT = MOE
OP_TYPE = CONTRACT.op_type
SCHEMA = CONTRACT.schema()

BODY = """
<domain: "gemma4", opset_import: ["" : 20]>
MoE <top_k> (x, router_logits, per_expert_scale, gate_up, down) => (y)
{
  k0 = Constant <value_int: int = @top_k> ()
  ax0 = Constant <value_ints: ints = [0]> ()
  ax1 = Constant <value_ints: ints = [1]> ()
  ax2 = Constant <value_ints: ints = [2]> ()
  ax3 = Constant <value_ints: ints = [3]> ()
  ax13 = Constant <value_ints: ints = [1, 3]> ()
  last = Constant <value_ints: ints = [-1]> ()
  K = Unsqueeze (k0, ax0)
  logits32 = Cast <to = 1> (router_logits)
  probs = Softmax <axis = -1> (logits32)
  w0, idx = TopK <axis = -1> (probs, K)
  wsum = ReduceSum <keepdims = 1> (w0, last)
  w1 = Div (w0, wsum)
  pes32 = Cast <to = 1> (per_expert_scale)
  pes = Gather (pes32, idx)
  w = Mul (w1, pes)
  gu = Gather <axis = 0> (gate_up, idx)
  xe = Unsqueeze (x, ax13)
  h4 = MatMul (gu, xe)
  h = Squeeze (h4, ax3)
  gate, up = Split <axis = -1, num_outputs = 2> (h)
  act = Gelu <approximate = "tanh"> (gate)
  a = Mul (act, up)
  dn = Gather <axis = 0> (down, idx)
  a4 = Unsqueeze (a, ax3)
  y4 = MatMul (dn, a4)
  yk = Squeeze (y4, ax3)
  yk32 = Cast <to = 1> (yk)
  w3 = Unsqueeze (w, ax2)
  weighted = Mul (yk32, w3)
  y32 = ReduceSum <keepdims = 0> (weighted, ax1)
  y = CastLike (y32, x)
}
"""


def function() -> onnx.FunctionProto:
    return onnx.parser.parse_function(BODY)


def translation():
    """onnxscript translation for torch.ops.gemma4.moe: one custom node."""
    opset = register_schema(SCHEMA)

    def moe_to_onnx(x, router_logits, per_expert_scale, gate_up, down, top_k: int):
        return opset.MoE(
            x, router_logits, per_expert_scale, gate_up, down, top_k=top_k, **CONTRACT.plugin_attributes()
        )

    return moe_to_onnx
