"""`gemma4::MoE`: routing (softmax over all experts, top-k, renormalize, x per_expert_scale) + GELU-tanh experts.

Semantics: `gemma4_compile.model.ops.moe`. `BODY` loops over the experts that some token picked (`Unique` of
the routed ids), so a step reads only those experts' weights and its matmuls touch only the routed tokens: a
one-token decode step runs top_k experts, not all E (issue #18; benchmarks/cpu_vs_llamacpp.py). Scratch is
independent of the token count. `BODY_GATHER`, an earlier body, gathers the chosen experts' weights per
token (T*K*2I*H scratch, ~0.2 GB per token at 26B-A4B size): the fastest form for exactly one token, a loss
beyond. `BODY_SPLIT`, the export's, is `BODY_GATHER` for one token and `BODY` otherwise. `BODY_STATIC` is the loop over all E experts without data-dependent shapes, which the
engine builder inlines for TensorRT (engines/prepare.py); the TensorRT plugin does the real grouped GEMM. The onnxruntime runner
swaps BODY_SPLIT's one-token branch for our CPU kernel where it is built (`step_kernel`: calls of up to 16 tokens,
runners/ort_kernels); the exported file keeps the body.
"""

from __future__ import annotations

import onnx

from ..onnx_domain import KERNEL_DOMAIN, register_schema
from . import MOE

CONTRACT = MOE
OP_TYPE = CONTRACT.op_type
SCHEMA = CONTRACT.schema()

BODY_GATHER = """
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

# Per hit expert e (a Loop over the sorted distinct routed ids): pick its (token, slot) pairs, run its GLU on
# those tokens only, scatter-add the weighted rows into an fp32 accumulator. Scratch is one expert's weights
# and [n_e, 2I] activations; experts no token picked cost nothing. Accumulates in ascending expert order, as
# the torch reference does.
BODY = """
<domain: "gemma4", opset_import: ["" : 20]>
MoE <top_k> (x, router_logits, per_expert_scale, gate_up, down) => (y)
{
  k0 = Constant <value_int: int = @top_k> ()
  ax0 = Constant <value_ints: ints = [0]> ()
  ax1 = Constant <value_ints: ints = [1]> ()
  last = Constant <value_ints: ints = [-1]> ()
  first = Constant <value_int: int = 0> ()
  zero = Constant <value_float: float = 0.0> ()
  one = Constant <value_int: int = 1> ()
  go = Cast <to = 9> (one)
  K = Unsqueeze (k0, ax0)
  logits32 = Cast <to = 1> (router_logits)
  probs = Softmax <axis = -1> (logits32)
  w0, idx = TopK <axis = -1> (probs, K)
  wsum = ReduceSum <keepdims = 1> (w0, last)
  w1 = Div (w0, wsum)
  pes32 = Cast <to = 1> (per_expert_scale)
  pes = Gather (pes32, idx)
  w = Mul (w1, pes)
  TH = Shape (x)
  acc0 = Expand (zero, TH)
  routed = Reshape (idx, last)
  hit_ids = Unique <sorted = 1> (routed)
  U1 = Shape (hit_ids)
  U = Squeeze (U1, ax0)
  acc = Loop (U, go, acc0) <body = expert (int64 i, bool c_in, float[T,H] acc_in) => (bool c_out, float[T,H] acc_out) {
    c_out = Identity (c_in)
    e = Gather (hit_ids, i)
    hit = Equal (idx, e)
    pairs = NonZero (hit)
    tok = Gather <axis = 0> (pairs, first)
    xe = Gather <axis = 0> (x, tok)
    gu = Gather <axis = 0> (gate_up, e)
    h = Gemm <transB = 1> (xe, gu)
    gate, up = Split <axis = -1, num_outputs = 2> (h)
    act = Gelu <approximate = "tanh"> (gate)
    a = Mul (act, up)
    dn = Gather <axis = 0> (down, e)
    ye = Gemm <transB = 1> (a, dn)
    ye32 = Cast <to = 1> (ye)
    pt = Transpose <perm = [1, 0]> (pairs)
    we = GatherND (w, pt)
    we1 = Unsqueeze (we, ax1)
    rows = Mul (ye32, we1)
    tok1 = Unsqueeze (tok, ax1)
    acc_out = ScatterND <reduction = "add"> (acc_in, tok1, rows)
  }>
  y = CastLike (acc, x)
}
"""

# The same Loop without data-dependent shapes, for TensorRT inlining (TensorRT-RTX has no NonZero or Unique):
# it runs over all E experts, each on every token, its rows weighted by the token's routing weight for it (0
# where not chosen). Scratch stays [T, 2I]; work is E/K times the routed work, acceptable where the plugin is
# the real path.
BODY_STATIC = (
    BODY.replace(
        """  routed = Reshape (idx, last)
  hit_ids = Unique <sorted = 1> (routed)
  U1 = Shape (hit_ids)
  U = Squeeze (U1, ax0)
""",
        """  U1 = Shape <start = 0, end = 1> (gate_up)
  U = Squeeze (U1, ax0)
""",
    )
    .replace(
        """    e = Gather (hit_ids, i)
    hit = Equal (idx, e)
    pairs = NonZero (hit)
    tok = Gather <axis = 0> (pairs, first)
    xe = Gather <axis = 0> (x, tok)
""",
        """    e = Identity (i)
    hit = Equal (idx, e)
    hitf = Cast <to = 1> (hit)
    wk = Mul (w, hitf)
    we1 = ReduceSum <keepdims = 1> (wk, last)
    xe = Identity (x)
""",
    )
    .replace(
        """    pt = Transpose <perm = [1, 0]> (pairs)
    we = GatherND (w, pt)
    we1 = Unsqueeze (we, ax1)
    rows = Mul (ye32, we1)
    tok1 = Unsqueeze (tok, ax1)
    acc_out = ScatterND <reduction = "add"> (acc_in, tok1, rows)
""",
        """    rows = Mul (ye32, we1)
    acc_out = Add (acc_in, rows)
""",
    )
)


def _split_body() -> str:
    """One token (a batch-1 decode step): BODY_GATHER's single gather of the K picked experts and one batched
    GEMV; more tokens: BODY's loop over the distinct picked experts. Both accumulate in fp32; only the order of
    the K terms differs (routing order vs ascending expert id)."""
    routing_end = "  w = Mul (w1, pes)\n"
    head = BODY[: BODY.index(routing_end) + len(routing_end)]
    for name in ("ax2", "ax3"):  # the gather branch's extra axes
        head = head.replace(
            "  last = ", f"  {name} = Constant <value_ints: ints = [{name[-1]}]> ()\n  last = ", 1
        )
    head = head.replace("  last = ", "  ax13 = Constant <value_ints: ints = [1, 3]> ()\n  last = ", 1)
    gather = BODY_GATHER[
        BODY_GATHER.index(routing_end) + len(routing_end) : BODY_GATHER.index("  y = CastLike")
    ]
    loop = BODY[BODY.index(routing_end) + len(routing_end) : BODY.index("  y = CastLike")]
    indent = lambda text: "".join(f"  {line}\n" for line in text.rstrip("\n").split("\n"))  # noqa: E731
    return (
        head
        + "  T1 = Shape <start = 0, end = 1> (x)\n  n_tok = Squeeze (T1, ax0)\n  single = Equal (n_tok, one)\n"
        + "  y32 = If (single) <then_branch = one_token () => (float[T,H] y_gather) {\n"
        + indent(gather.replace("y32 = ", "y_gather = "))
        + "  }, else_branch = tokens () => (float[T,H] y_loop) {\n"
        + indent(loop)
        + "    y_loop = Identity (acc)\n  }>\n  y = CastLike (y32, x)\n}\n"
    )


# The export's body: what onnxruntime runs (TensorRT inlines BODY_STATIC, engines/prepare.py). A one-token step
# reads its K experts with one Gather and runs them as one batched GEMV: 22 % less time than BODY's loop on the
# mid MoE config's 12 layers (benchmarks/moe_decode.py, cold weights); BODY's loop stays for more tokens, where
# per-token gathers cost T*K expert copies (1.9x BODY at 4 tokens).
BODY_SPLIT = _split_body()


# Calls of up to this many tokens take the kernel (decode steps at batch 1-16); more take BODY's loop, which reads
# each routed expert once for all its tokens where the kernel reads it per token. Mid MoE config, 2 threads,
# kernel / body: batch-4 decode 0.30, batch-16 0.81, a 32-token prefill 0.96, a 64-token one 1.29.
STEP_MAX_TOKENS = 16
# BODY's routing values, which the kernel computes itself
ROUTING = ("probs", "w0", "idx", "wsum", "w1", "pes", "w")


def step_kernel(function: onnx.FunctionProto, max_tokens: int = 1) -> onnx.FunctionProto:
    """`function` (BODY_SPLIT's) with its one-token branch replaced by one `gemma4_ort::MoEStep` node (the same
    semantics, its experts read in place: runners/ort_kernels), taken by calls of up to `max_tokens` tokens,
    for onnxruntime sessions that load that library. The routing nodes move into the other branch, the only
    one still reading them."""
    out = onnx.FunctionProto()
    out.CopyFrom(function)
    split = next(
        (n for n in out.node for a in n.attribute if a.name == "then_branch" and a.g.name == "one_token"),
        None,
    )
    routing = [n for n in out.node if set(n.output) & set(ROUTING)]
    if split is None or {o for n in routing for o in n.output} != set(ROUTING):
        raise ValueError(f"function {function.name}: not BODY_SPLIT (no one-token branch or routing)")
    branches = {a.name: a.g for a in split.attribute}
    one_token, tokens = branches["then_branch"], branches["else_branch"]
    step = onnx.helper.make_node(
        "MoEStep",
        ["x", "logits32", "pes32", "gate_up", "down"],
        [one_token.output[0].name],
        domain=KERNEL_DOMAIN,
    )
    step.attribute.add().CopyFrom(
        onnx.AttributeProto(name="top_k", ref_attr_name="top_k", type=onnx.AttributeProto.INT)
    )
    del one_token.node[:]
    one_token.node.append(step)
    if max_tokens > 1:  # calls of up to max_tokens tokens take the kernel
        limit = onnx.helper.make_node("Constant", [], ["step_max"], value_int=max_tokens)
        few = onnx.helper.make_node("LessOrEqual", ["n_tok", "step_max"], ["step_few"])
        split.input[0] = "step_few"
        at = list(out.node).index(split)
        out.node.insert(at, few)
        out.node.insert(at, limit)
    kept = [*tokens.node]
    del tokens.node[:]
    tokens.node.extend([*routing, *kept])
    for node in routing:
        out.node.remove(node)
    if all(o.domain != KERNEL_DOMAIN for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid(KERNEL_DOMAIN, 1))
    return out


def function(body: str = BODY_SPLIT) -> onnx.FunctionProto:
    """The function proto of a body text (`BODY_SPLIT`, the export's, by default)."""
    return onnx.parser.parse_function(body)


def translation():
    """onnxscript translation for torch.ops.gemma4.moe: one custom node."""
    opset = register_schema(SCHEMA)

    def moe_to_onnx(x, router_logits, per_expert_scale, gate_up, down, top_k: int):
        return opset.MoE(
            x, router_logits, per_expert_scale, gate_up, down, top_k=top_k, **CONTRACT.plugin_attributes()
        )

    return moe_to_onnx
