"""RMSNormAsDiv: the traced RMSNorm becomes Sqrt -> Div, which onnxruntime fuses; numbers move by rounding only."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from gemma4_compile.passes import RemoveUnusedNodesPass, RMSNormAsDiv, run_passes

# What torch.onnx emits for `h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5) * w`, and a Pow(-0.5)
# that is no norm (its base is no mean of squares): that one stays.
MODEL = """
<ir_version: 10, opset_import: ["" : 20]>
g (float[N, 64] x, float[64] w, float[N, 64] other) => (float[N, 64] y, float[N, 64] z) {
    two = Constant <value_float = 2.0> ()
    axes = Constant <value_ints = [-1]> ()
    eps = Constant <value_float = 1e-6> ()
    minus_half = Constant <value_float = -0.5> ()
    sq = Pow (x, two)
    ms = ReduceMean <keepdims = 1> (sq, axes)
    mse = Add (ms, eps)
    r = Pow (mse, minus_half)
    n = Mul (x, r)
    y = Mul (n, w)
    r2 = Pow (other, minus_half)
    z = Mul (x, r2)
}
"""


def _session(model: ir.Model, path=None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if path:
        options.optimized_model_filepath = str(path)
    proto = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])


def test_the_norm_reads_sqrt_div_and_onnxruntime_fuses_it(tmp_path):
    model = ir.from_onnx_text(MODEL)
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((5, 64)).astype(np.float32),
        "w": rng.standard_normal(64).astype(np.float32),
        "other": rng.random((5, 64)).astype(np.float32) + 0.5,
    }
    before = _session(model).run(None, feeds)
    rewrite = RMSNormAsDiv()
    run_passes(model, [rewrite, RemoveUnusedNodesPass()])
    assert rewrite.rewritten == 1
    ops = [n.op_type for n in model.graph if n.op_type != "Constant"]
    assert ops == ["Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul", "Pow", "Mul"]
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    after = _session(model, tmp_path / "opt.onnx").run(None, feeds)
    np.testing.assert_allclose(after[0], before[0], rtol=1e-6, atol=1e-6)  # rounding, not math
    np.testing.assert_array_equal(after[1], before[1])  # the other Pow is untouched
    fused = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert "SimplifiedLayerNormalization" in fused and fused.count("Pow") == 1
