"""For onnxruntime only: RMSNorms and rotary embeddings of the inlined decoder as one onnxruntime kernel each.

At batch 1 a decode step is some 600 small kernels, and their count is what a step costs. Two patterns of the
inlined attention body that onnxruntime's own optimizers leave as chains:

- **RMSNorm without a scale** (the value norm, `v / sqrt(mean(v²) + eps)`): onnxruntime's
  SimplifiedLayerNormFusion wants a `Mul` by a scale after the division, so five kernels run per layer. The
  weighted norms (which it already fuses) get a rule here too, so every norm is fused the same way.
- **Rotary embedding** (`x·cos + rotate_half(x)·sin` on [B, N, S, H]): Slice, Slice, Neg, Concat, Mul, Mul, Add
  per query and per key. `com.microsoft.RotaryEmbedding` does it in one, reading cos / sin rows by position id.
  Its tables here are the model's own angles `f` [B, S, H/2] (positions x inv_freq) flattened to [B·S, H/2],
  and the position ids are 0..B·S-1 shaped [B, S]: the same cos / sin values as `Cos(concat(f, f))`, so the
  rotation is the same math (the kernel may contract a multiply-add: within an ulp per element).

Exactness is asserted against the plain graph (tests/passes/test_ort_fusions.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

__all__ = ["FuseForOrt", "rule_sets"]

_INT64_MAX = np.iinfo(np.int64).max


def _const(value: ir.Value | None) -> np.ndarray | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else tensor.numpy()


def _singleton(value: ir.Value | None) -> float | int | None:
    array = _const(value)
    return array.item() if array is not None and array.size == 1 else None


def _last_axis(axes: ir.Value, x: ir.Value) -> bool:
    """`axes` names only the last axis of `x` (as -1 or rank-1)."""
    axis, rank = _singleton(axes), len(x.shape) if x.shape is not None else None
    return axis == -1 or (rank is not None and axis == rank - 1)


def _rms_check(x: ir.Value, axes: ir.Value, two: ir.Value, epsilon: ir.Value) -> pattern.MatchResult:
    result = pattern.MatchResult()
    if x.dtype != ir.DataType.FLOAT:
        return result.fail("not a float32 norm", x)
    if _singleton(two) != 2.0 or not _last_axis(axes, x) or not isinstance(_singleton(epsilon), float):
        return result.fail("not an RMSNorm over the last axis")
    return result


def _rms_pattern(op, x, axes, two, epsilon):
    mean_square = op.ReduceMean(op.Pow(x, two), axes, keepdims=1, _allow_other_attributes=True)
    return op.Div(x, op.Sqrt(op.Add(mean_square, epsilon)))


class ScaledRmsNorm(pattern.RewriteRuleClassBase):
    """x / sqrt(mean(x²) + eps) · w -> SimplifiedLayerNormalization(x, w)."""

    def pattern(self, op, x, axes, two, epsilon, weight):
        return op.Mul(_rms_pattern(op, x, axes, two, epsilon), weight)

    def check(self, context, x, axes, two, epsilon, weight, **_) -> pattern.MatchResult:
        result = _rms_check(x, axes, two, epsilon)
        constant = weight.const_value is not None or (
            weight.producer() and weight.producer().op_type == "Constant"
        )
        if result and (not constant or len(weight.shape or ()) != 1 or weight.dtype != ir.DataType.FLOAT):
            return result.fail("the scale is not a constant vector", weight)
        return result

    def rewrite(self, op, x, epsilon, weight, **_):
        return _simplified(op, x, weight, epsilon)


class UnitRmsNorm(pattern.RewriteRuleClassBase):
    """x / sqrt(mean(x²) + eps) -> SimplifiedLayerNormalization(x, ones)."""

    def pattern(self, op, x, axes, two, epsilon):
        return _rms_pattern(op, x, axes, two, epsilon)

    def check(self, context, x, axes, two, epsilon, **_) -> pattern.MatchResult:
        result = _rms_check(x, axes, two, epsilon)
        if result and (x.shape is None or not isinstance(x.shape[-1], int)):
            return result.fail("the normalized size is unknown", x)
        return result

    def rewrite(self, op, x, epsilon, **_):
        ones = op.Constant(value=ir.tensor(np.ones(x.shape[-1], np.float32)))
        return _simplified(op, x, ones, epsilon)


def _simplified(op, x: ir.Value, scale: ir.Value, epsilon: ir.Value) -> ir.Value:
    # onnxruntime registers SimplifiedLayerNormalization in the default domain (stash_type 1: float32 statistics)
    return op.SimplifiedLayerNormalization(
        x, scale, axis=-1, epsilon=float(_singleton(epsilon)), stash_type=1
    )


class Rotary(pattern.RewriteRuleClassBase):
    """x·cos + concat(-x[..., h:], x[..., :h])·sin on [B, N, S, 2h], cos / sin = Cos / Sin(concat(f, f)) of
    angles f [B, S, h] -> com.microsoft.RotaryEmbedding(x, ids, Cos(f'), Sin(f'))."""

    def pattern(self, op, x, cos, sin, s1, e1, a1, t1, s2, e2, a2, t2):
        first, second = op.Slice(x, s1, e1, a1, t1), op.Slice(x, s2, e2, a2, t2)
        rotated = op.Concat(op.Neg(second), first, axis=-1)
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))

    def check(self, context, x, cos, sin, s1, e1, a1, t1, s2, e2, a2, t2, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.dtype != ir.DataType.FLOAT or x.shape is None or len(x.shape) != 4:
            return result.fail("not a float32 [B, N, S, H] tensor", x)
        head = x.shape[3]
        if not isinstance(head, int) or head % 2:
            return result.fail("the head size is unknown or odd", x)
        half = head // 2
        bounds = [_singleton(v) for v in (s1, e1, s2, t1, t2)]
        halves = bounds == [0, half, half, 1, 1]
        if not (halves and (_singleton(e2) or 0) >= head and _last_axis(a1, x) and _last_axis(a2, x)):
            return result.fail("not the two halves of the last axis")
        if _half_angles(cos, sin, half) is None:
            return result.fail("cos / sin are not of concat(f, f) unsqueezed at axis 1", cos)
        return result

    def rewrite(self, op, x, cos, sin, **_):
        half_angles = _half_angles(cos, sin, x.shape[3] // 2)
        flat = op.Reshape(half_angles, op.Constant(value_ints=[-1, x.shape[3] // 2]))
        rows = op.Squeeze(op.Shape(flat, start=0, end=1))
        ids = op.Range(op.Constant(value_int=0), rows, op.Constant(value_int=1))
        ids = op.Reshape(ids, op.Shape(half_angles, start=0, end=2))
        return op.RotaryEmbedding(x, ids, op.Cos(flat), op.Sin(flat), interleaved=0, _domain="com.microsoft")


def _half_angles(cos: ir.Value, sin: ir.Value, half: int) -> ir.Value | None:
    """f [B, S, half] when `cos`, `sin` are Cos, Sin of Unsqueeze(concat(f, f, axis=-1), [1]) (through slices
    that keep everything); None otherwise. Cos and Sin are shared by the layers, so they stay outside the
    pattern (the last fusion leaves them unused)."""
    cos_node, sin_node = cos.producer(), sin.producer()
    if cos_node is None or sin_node is None or (cos_node.op_type, sin_node.op_type) != ("Cos", "Sin"):
        return None
    if cos_node.inputs[0] is not sin_node.inputs[0]:
        return None
    node = cos_node.inputs[0].producer()
    if node is None or node.op_type != "Unsqueeze" or _singleton(node.inputs[1]) != 1:
        return None
    node = node.inputs[0].producer()
    while node is not None and node.op_type == "Slice" and _keeps_all(node):
        node = node.inputs[0].producer()
    if node is None or node.op_type != "Concat" or node.attributes.get_int("axis") not in (-1, 2):
        return None
    f = node.inputs[0]
    if len(node.inputs) != 2 or node.inputs[1] is not f or f.shape is None or len(f.shape) != 3:
        return None
    return f if f.shape[2] == half and f.dtype == ir.DataType.FLOAT else None


def _keeps_all(node: ir.Node) -> bool:
    """A Slice from 0 to the end with step 1 (what `t[:]` traces to)."""
    start, end = _singleton(node.inputs[1]), _singleton(node.inputs[2])
    step = _singleton(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else 1
    return start == 0 and end == _INT64_MAX and step == 1


def rule_sets() -> list[pattern.RewriteRuleSet]:
    """The fusions, in the order they must run. The weighted norms go first, as a pass of their own: a rule set
    tries its rules at each node in graph order, and the unit rule (anchored at the division) would otherwise
    take each weighted norm's division before the weighted rule (anchored at the `Mul` after it) sees it,
    leaving a norm and a `Mul`."""
    return [
        pattern.RewriteRuleSet([ScaledRmsNorm.rule()], commute=True),
        pattern.RewriteRuleSet([UnitRmsNorm.rule(), Rotary.rule()], commute=True),
    ]


class FuseForOrt(ir.passes.InPlacePass):
    """Apply `rule_sets()`; `fused` after a run: the number of rewrites."""

    def __init__(self) -> None:
        super().__init__()
        self.fused = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.fused = sum(rules.apply_to_model(model) for rules in rule_sets())
        return ir.passes.PassResult(model, modified=self.fused > 0)
