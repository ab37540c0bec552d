"""passes/ort_fusions.py: RMSNorms and rotary embeddings of the inlined decoder as one onnxruntime kernel each,
only where the pattern is exactly the math the kernel does."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from gemma4_compile.export.manifest import DECODER, ExportManifest
from gemma4_compile.passes.ort_fusions import FuseForOrt
from gemma4_compile.passes.share_shapes import shared_decoder


@pytest.mark.parametrize("preset", ["tiny-e2b", "tiny-26b-a4b"])  # KV-shared layers; k = v global layers
def test_every_norm_and_rotation_of_the_decoder_is_fused(make_export, preset):
    path = ExportManifest.load(make_export(preset)).graph_path(DECODER)
    before = collections.Counter(
        n.op_type for n in onnx.load_from_string(shared_decoder(path, False)).graph.node
    )
    graph = onnx.load_from_string(shared_decoder(path)).graph
    after = collections.Counter(n.op_type for n in graph.node)
    assert before["Sqrt"] > 0 and after["Sqrt"] == after["ReduceMean"] == 0  # each RMSNorm had one of each
    # 26B-A4B: the MLP's and the MoE's pre-norms share one division by the RMS; each becomes a kernel
    assert after["SimplifiedLayerNormalization"] >= before["Sqrt"]
    assert before["Neg"] > 0 and after["Neg"] == 0  # each rotate_half had one Neg
    assert after["RotaryEmbedding"] == before["Neg"]
    assert after["Cos"] == after["Sin"] == 2  # one table per layer type, shared by its layers
    # a weighted norm is one kernel with its weight inside: no Mul by a weight after a norm
    weights = {i.name for i in graph.initializer}
    normed = {n.output[0] for n in graph.node if n.op_type == "SimplifiedLayerNormalization"}
    scaled_after = [
        n.name for n in graph.node if n.op_type == "Mul" and {*n.input} & normed and {*n.input} & weights
    ]
    assert not scaled_after


ROPE = """
<ir_version: 10, opset_import: ["" : 20]>
g (float[2, 3, 5, 8] x, float[2, 5, 4] f) => (float[2, 3, 5, 8] y)
{{
  ff = Concat <axis = -1> (f, f)
  one = Constant <value_ints = [1]> ()
  u = Unsqueeze (ff, one)
  cos = Cos (u)
  sin = Sin ({sin_of})
  zero = Constant <value_ints = [0]> ()
  half = Constant <value_ints = [4]> ()
  end = Constant <value_ints = [9223372036854775807]> ()
  last = Constant <value_ints = [3]> ()
  step = Constant <value_ints = [1]> ()
  x1 = Slice (x, zero, half, last, step)
  x2 = Slice (x, half, end, last, step)
  n2 = Neg (x2)
  r = Concat <axis = -1> ({rotated})
  a = Mul (x, cos)
  b = Mul (r, sin)
  y = Add (a, b)
}}
"""
RIGHT = {"sin_of": "u", "rotated": "n2, x1"}


def _fused(text: str) -> tuple[ir.Model, int]:
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    fuse = FuseForOrt()
    fuse(model)
    return model, fuse.fused


def _run(model: ir.Model, **feeds: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )[0]


def test_rotary_fusion_computes_the_pattern():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
    f = (rng.random((2, 5, 4)) * 50).astype(np.float32)  # rows differ per batch: per-row positions
    cos, sin = np.cos(np.concatenate([f, f], -1))[:, None], np.sin(np.concatenate([f, f], -1))[:, None]
    want = x * cos + np.concatenate([-x[..., 4:], x[..., :4]], -1) * sin
    model, fused = _fused(ROPE.format(**RIGHT))
    assert fused == 1 and [n.op_type for n in model.graph if n.domain == "com.microsoft"] == [
        "RotaryEmbedding"
    ]
    np.testing.assert_allclose(_run(model, x=x, f=f), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "change",
    [
        {"rotated": "x1, n2"},  # the other rotation direction
        {"sin_of": "ff"},  # sin of other angles than cos
    ],
)
def test_rotary_lookalikes_are_left_alone(change):
    _, fused = _fused(ROPE.format(**{**RIGHT, **change}))
    assert fused == 0


RMS = """
<ir_version: 10, opset_import: ["" : 20]>
g (float[2, 6, 8] x) => (float[2, 6, 8] y)
{{
  two = Constant <value_float = 2.0> ()
  axes = Constant <value_ints = [{axis}]> ()
  eps = Constant <value_float = 1e-6> ()
  p = Pow (x, two)
  m = ReduceMean <keepdims = 1> (p, axes)
  s = Add (m, eps)
  r = Sqrt (s)
  y = Div (x, r)
}}
"""


def test_unit_rms_norm_is_fused_over_the_last_axis_only():
    x = np.random.default_rng(1).standard_normal((2, 6, 8)).astype(np.float32)
    model, fused = _fused(RMS.format(axis=-1))
    assert fused == 1 and [n.op_type for n in model.graph if n.op_type != "Constant"] == [
        "SimplifiedLayerNormalization"
    ]
    want = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(_run(model, x=x), want, rtol=1e-6, atol=1e-6)
    assert _fused(RMS.format(axis=1))[1] == 0  # not the last axis: not what the kernel computes
