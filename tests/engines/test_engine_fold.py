"""Constant folding before parsing: what TensorRT-RTX rejects without it, and that it changes no numbers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gemma4_compile.engines.fold import fold_constant_subgraphs

# ReduceMean whose axes come from Reshape(Constant, Constant): what torch.onnx (optimize=False) emits for RMSNorm.
MODEL = """
<ir_version: 10, opset_import: ["" : 20]>
g (float[N, 8] x) => (float[N, 1] y, float[N, 8] z) {
    axes_raw = Constant <value_ints = [-1]> ()
    shape = Constant <value_ints = [1]> ()
    axes = Reshape (axes_raw, shape)
    half = Constant <value_float = 0.5> ()
    half16 = Cast <to = 10> (half)
    half32 = Cast <to = 1> (half16)
    y = ReduceMean <keepdims = 1> (x, axes)
    z = Mul (x, half32)
}
"""


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )


def test_folds_constant_subgraphs_and_keeps_the_numbers():
    model = onnx.parser.parse_model(MODEL)
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    before = _run(model, x)
    assert fold_constant_subgraphs(model) == 3  # Reshape, Cast, Cast
    assert [n.op_type for n in model.graph.node] == ["Constant"] * 6 + ["ReduceMean", "Mul"]
    onnx.checker.check_model(model, full_check=True)
    for a, b in zip(before, _run(model, x)):
        np.testing.assert_array_equal(a, b)


def test_leaves_weights_activations_and_big_constants_alone():
    model = onnx.parser.parse_model("""
    <ir_version: 10, opset_import: ["" : 20]>
    g (float[N, 8] x) => (float[N, 8] y, float[5000] big) <float[8] w = {1,2,3,4,5,6,7,8}> {
        shape = Constant <value_ints = [5000]> ()
        big = ConstantOfShape <value = float {1.0}> (shape)
        w2 = Mul (w, w)
        y = Add (x, w2)
    }
    """)
    assert fold_constant_subgraphs(model) == 0  # initializers (weights) are never read


@pytest.mark.rtx
def test_rtx_parser_needs_the_fold():
    import tensorrt_rtx as trt

    def parse(model: onnx.ModelProto) -> list[str]:
        logger = trt.Logger(trt.Logger.ERROR)
        network = trt.Builder(logger).create_network(0)
        parser = trt.OnnxParser(network, logger)
        parser.parse(model.SerializeToString())
        return [parser.get_error(i).desc() for i in range(parser.num_errors)]

    model = onnx.parser.parse_model(MODEL)
    errors = parse(model)
    assert len(errors) == 1 and "Axis input must resolve to a build-time constant" in errors[0]
    fold_constant_subgraphs(model)
    assert parse(model) == []
