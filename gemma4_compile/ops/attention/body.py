"""`gemma4::SlidingWindowAttention`: exporter translation and the standard-op reference body.

Semantics: `gemma4_compile.model.ops.attention` (ring-buffer cache, window W keys including self, GQA).
The contract (schema, attributes, plugin) is this package's. The body is plain opset-20 ONNX, so
onnxruntime runs it and TensorRT can inline it when no plugin is loaded.
"""

from __future__ import annotations

import functools

import onnx

from ..onnx_domain import DOMAIN, KERNEL_DOMAIN, register_schema
from . import SLIDING_WINDOW_ATTENTION

CONTRACT = SLIDING_WINDOW_ATTENTION
OP_TYPE = CONTRACT.op_type
SCHEMA = CONTRACT.schema()

# The body is assembled from three parts so that passes/lower_gqa.py can swap the attention part alone.
SIGNATURE = "SlidingWindowAttention <{attrs}> (q, k, v, past_k, past_v, past_len, seq_len{extra}) => (out, present_k, present_v)"

PRELUDE = """
  zero = Constant <value_int: int = 0> ()
  one = Constant <value_int: int = 1> ()
  one1 = Constant <value_ints: ints = [1]> ()
  ax0 = Constant <value_ints: ints = [0]> ()
  ax1 = Constant <value_ints: ints = [1]> ()
  ax2 = Constant <value_ints: ints = [2]> ()
  B1 = Shape <start = 0, end = 1> (q)
  S1 = Shape <start = 2, end = 3> (q)
  C1 = Shape <start = 2, end = 3> (past_k)
  S = Squeeze (S1)
  C = Squeeze (C1)
  j = Range (zero, C, one)
  j_row = Unsqueeze (j, ax0)
  pl_col = Unsqueeze (past_len, ax1)
  idx_shape = Concat <axis = 0> (B1, one1, C1, one1)
  pshape = Shape (past_k)
"""

# softmax(q k^T * scale + mask) v over (ring slots ++ new tokens), each key tagged with its position
ATTEND = """
  minus1 = Constant <value_ints: ints = [-1]> ()
  ax12 = Constant <value_ints: ints = [1, 2]> ()
  win = Constant <value_int: int = @window> ()
  scl = Constant <value_float: float = @scale> ()
  neg = Constant <value_float: float = -3.4028234663852886e38> ()
  D1 = Shape <start = 3, end = 4> (q)
  Hkv1 = Shape <start = 1, end = 2> (k)
  s_idx = Range (zero, S, one)
  s_row = Unsqueeze (s_idx, ax0)
  q_pos = Add (pl_col, s_row)
  last = Sub (pl_col, one)
  back = Sub (last, j_row)
  back_mod = Mod (back, C)
  slot_pos = Sub (last, back_mod)
  slot_ok = GreaterOrEqual (slot_pos, zero)
  sl_col = Unsqueeze (seq_len, ax1)
  new_ok = Less (s_row, sl_col)
  k_pos = Concat <axis = 1> (slot_pos, q_pos)
  k_ok = Concat <axis = 1> (slot_ok, new_ok)
  kp3 = Unsqueeze (k_pos, ax1)
  qp3 = Unsqueeze (q_pos, ax2)
  ko3 = Unsqueeze (k_ok, ax1)
  causal = LessOrEqual (kp3, qp3)
  lo = Sub (qp3, win)
  in_win = Greater (kp3, lo)
  is_global = Equal (win, zero)
  win_ok = Or (in_win, is_global)
  vis0 = And (ko3, causal)
  visible = And (vis0, win_ok)
  keys = Concat <axis = 2> (past_k, k)
  values = Concat <axis = 2> (past_v, v)
  g_shape = Concat <axis = 0> (B1, Hkv1, minus1, S1, D1)
  qg = Reshape (q, g_shape)
  k5 = Unsqueeze (keys, ax2)
  kt = Transpose <perm = [0, 1, 2, 4, 3]> (k5)
  raw = MatMul (qg, kt)
  sc = CastLike (scl, raw)
  scaled = Mul (raw, sc)
  s32 = Cast <to = 1> (scaled)
  vis5 = Unsqueeze (visible, ax12)
  masked = Where (vis5, s32, neg)
  p32 = Softmax <axis = -1> (masked)
  p = CastLike (p32, q)
  v5 = Unsqueeze (values, ax2)
  o5 = MatMul (p, v5)
  qshape = Shape (q)
  out = Reshape (o5, qshape)
"""

# write the valid new tokens into the ring: slot j takes the latest position == j (mod C), if it is new
RING_UPDATE = """
  total = Add (past_len, seq_len)
  tcol = Unsqueeze (total, ax1)
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
"""

# onnxruntime's form of the same update, which the runner swaps in (`decode_ring`): a one-token call writes its
# row into a copy of each cache with ScatterND, instead of rebuilding every slot through a broadcast
# GatherElements + Where, whose cost grows with the cache (benchmarks/RESULTS.md, 2026-12-04 third session).
# ScatterND at (batch, head, slot) copies whole rows: 3x faster than ScatterElements' per-element indices on a
# [1, 4, 64, 64] cache (2026-12-04 sixth session). A row with seq_len 0 writes its slot's old value back. More
# tokens per call take RING_UPDATE. The indices are computed outside the If, where the runner's rewrite shares
# them between layers.
RING_UPDATE_DECODE = (
    """
  w_rows4 = Constant <value_ints: ints = [-1, 1, 1, 1]> ()
  w_heads4 = Constant <value_ints: ints = [1, -1, 1, 1]> ()
  w_slot = Mod (past_len, C)
  w_B = Squeeze (B1)
  w_b = Range (zero, w_B, one)
  w_H1 = Shape <start = 1, end = 2> (past_k)
  w_H = Squeeze (w_H1)
  w_h = Range (zero, w_H, one)
  w_grid = Concat <axis = 0> (B1, w_H1, one1, one1)
  w_b4 = Reshape (w_b, w_rows4)
  w_h4 = Reshape (w_h, w_heads4)
  w_s4 = Reshape (w_slot, w_rows4)
  w_bb = Expand (w_b4, w_grid)
  w_hh = Expand (w_h4, w_grid)
  w_ss = Expand (w_s4, w_grid)
  w_at = Concat <axis = 3> (w_bb, w_hh, w_ss)
  w_real = Greater (seq_len, zero)
  w_real4 = Reshape (w_real, w_rows4)
  w_single = Equal (S, one)
  present_k, present_v = If (w_single) <then_branch = one_token () => (pk1, pv1) {
    old_k = GatherND (past_k, w_at)
    old_v = GatherND (past_v, w_at)
    new_k = Where (w_real4, k, old_k)
    new_v = Where (w_real4, v, old_v)
    pk1 = ScatterND (past_k, w_at, new_k)
    pv1 = ScatterND (past_v, w_at, new_v)
  }, else_branch = tokens () => (pk2, pv2) {
"""
    + RING_UPDATE.replace("present_k =", "pk2 =").replace("present_v =", "pv2 =").replace("\n  ", "\n    ")
    + "  }>\n"
)


# with block_ids: a new key of the query's own image block (>= 0) is seen too, on sliding layers only;
# cached slots get -1 (they are all in the past, where causal already sees them)
BLOCKS = """
  BC = Concat <axis = 0> (B1, C1)
  slot_blk = Expand (minus1, BC)
  k_blk = Concat <axis = 1> (slot_blk, block_ids)
  kb3 = Unsqueeze (k_blk, ax1)
  qb3 = Unsqueeze (block_ids, ax2)
  same_blk = Equal (kb3, qb3)
  in_blk = GreaterOrEqual (qb3, zero)
  blk0 = And (same_blk, in_blk)
  sliding = Not (is_global)
  blk = And (blk0, sliding)
  seen = Or (causal, blk)
"""
CAUSAL_ONLY = "  vis0 = And (ko3, causal)\n"


def with_blocks(attend: str = ATTEND) -> str:
    """An attention part whose sliding mask also lets each image block see itself (the 8th input)."""
    if CAUSAL_ONLY not in attend:
        raise ValueError("this attention part has no causal mask line to extend with block ids")
    return attend.replace(CAUSAL_ONLY, BLOCKS + "  vis0 = And (ko3, seen)\n")


def body(
    attend: str = ATTEND,
    attrs: str = "window, scale",
    opsets: str = '"" : 20',
    block_ids: bool = False,
    ring: str = RING_UPDATE,
) -> str:
    """The function text: prelude + an attention part + a ring update. `block_ids`: the 8-input form
    (26B/31B exports with images); without it the body is the 7-input one, unchanged."""
    extra = ", block_ids" if block_ids else ""
    header = f'<domain: "gemma4", opset_import: [{opsets}]>\n' + SIGNATURE.format(attrs=attrs, extra=extra)
    attend = with_blocks(attend) if block_ids else attend
    return header + "\n{" + PRELUDE + attend + ring + "}\n"


def function(block_ids: bool = False) -> onnx.FunctionProto:
    return onnx.parser.parse_function(body(block_ids=block_ids))


@functools.cache
def _ring_nodes(ring: str) -> tuple[onnx.NodeProto, ...]:
    """The nodes of a ring-update part, parsed after the prelude it reads (callers copy, never mutate)."""
    nodes = onnx.parser.parse_function(body(attend="", ring=ring)).node
    prelude = onnx.parser.parse_function(body(attend="", ring="")).node
    return tuple(nodes[len(prelude) :])


def decode_ring(function: onnx.FunctionProto) -> onnx.FunctionProto:
    """`function` (any attention body built by `body`) with RING_UPDATE's nodes replaced by RING_UPDATE_DECODE's."""
    old, new = _ring_nodes(RING_UPDATE), _ring_nodes(RING_UPDATE_DECODE)
    made = {o for n in old for o in n.output}
    kept = [n for n in function.node if not made.intersection(n.output)]
    if len(function.node) - len(kept) != len(old):
        raise ValueError(f"function {function.name}: its ring update is not RING_UPDATE")
    taken = {o for n in kept for o in n.output}.intersection(o for n in new for o in n.output)
    if taken:
        raise ValueError(f"function {function.name}: names {sorted(taken)} are taken")
    out = onnx.FunctionProto()
    out.CopyFrom(function)
    del out.node[:]
    out.node.extend([*kept, *new])
    return out


def kernel_nodes(graph: onnx.GraphProto) -> int:
    """The graph's calls of this op become `gemma4_ort::SlidingWindowAttention` nodes (runners/ort_kernels
    attention.cc: the body's semantics in one fp32 CPU kernel), for onnxruntime sessions that load that library;
    a call whose caches nothing reads (a KV-sharing layer) leaves them out. Returns how many were swapped."""
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    swapped = 0
    for node in graph.node:
        if node.domain != DOMAIN or node.op_type != OP_TYPE:
            continue
        node.domain = KERNEL_DOMAIN
        kept = [a for a in node.attribute if a.name in ("window", "scale")]
        del node.attribute[:]
        node.attribute.extend(kept)
        if not read.intersection(node.output[1:]):
            del node.output[1:]
        swapped += 1
    return swapped


def translation():
    """onnxscript translation for torch.ops.gemma4.attention: one custom node, three outputs."""
    opset = register_schema(SCHEMA)

    def attention_to_onnx(
        q, k, v, past_k, past_v, past_len, seq_len, window: int, scale: float, block_ids=None
    ):
        blocks = () if block_ids is None else (block_ids,)  # absent: the 7-input node of text-only exports
        return opset.SlidingWindowAttention(
            q,
            k,
            v,
            past_k,
            past_v,
            past_len,
            seq_len,
            *blocks,
            window=window,
            scale=scale,
            **CONTRACT.plugin_attributes(),
        )

    return attention_to_onnx
