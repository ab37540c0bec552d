"""FoldConstants: what TensorRT-RTX rejects without it, that it changes no numbers, and what it never touches."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from gemma4_compile.passes import FoldConstants, RemoveUnusedNodesPass, run_on_proto, run_passes

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


def _run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_folds_constant_subgraphs_and_keeps_the_numbers():
    model = ir.from_onnx_text(MODEL)
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    before = _run(model, x)
    fold = FoldConstants()
    run_passes(model, [fold])
    assert fold.folded == 3  # Reshape, Cast, Cast
    assert [n.op_type for n in model.graph] == ["Constant"] * 6 + ["ReduceMean", "Mul"]
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    for a, b in zip(before, _run(model, x)):
        np.testing.assert_array_equal(a, b)
    run_passes(model, [RemoveUnusedNodesPass()])  # what the exporter runs next
    assert [n.op_type for n in model.graph] == ["Constant"] * 2 + ["ReduceMean", "Mul"]


def test_other_ops_fold_through_the_reference_evaluator():
    model = ir.from_onnx_text("""
    <ir_version: 10, opset_import: ["" : 20]>
    g (float[N, 3] x) => (float[N, 3] y) {
        a = Constant <value_floats = [1.0, 2.0, 3.0]> ()
        b = Mul (a, a)
        y = Add (x, b)
    }
    """)
    fold = FoldConstants()
    run_passes(model, [fold])
    assert fold.folded == 1 and [n.op_type for n in model.graph] == ["Constant", "Constant", "Add"]
    np.testing.assert_array_equal(
        model.graph.node(1).attributes["value"].as_tensor().numpy(), [1.0, 4.0, 9.0]
    )


def test_leaves_weights_activations_and_big_constants_alone():
    model = ir.from_onnx_text("""
    <ir_version: 10, opset_import: ["" : 20]>
    g (float[N, 8] x) => (float[N, 8] y, float[5000] big) <float[8] w = {1,2,3,4,5,6,7,8}> {
        shape = Constant <value_ints = [5000]> ()
        big = ConstantOfShape <value = float {1.0}> (shape)
        w2 = Mul (w, w)
        y = Add (x, w2)
    }
    """)
    fold = FoldConstants()
    run_passes(model, [fold])
    assert fold.folded == 0  # initializers (weights) are never read


@pytest.mark.parametrize("op", ["Unsqueeze", "Concat"])
def test_numpy_folders(op):
    body = {"Unsqueeze": "r = Unsqueeze (a, ax)", "Concat": "r = Concat <axis = 0> (a, a)"}[op]
    text = f"""
    <ir_version: 10, opset_import: ["" : 20]>
    g (float[N] x) => (float[N] y) {{
        a = Constant <value_ints = [2, 3]> ()
        ax = Constant <value_ints = [0]> ()
        {body}
        n = Shape (x)
        y = Identity (x)
    }}
    """
    model = ir.from_onnx_text(text)
    fold = FoldConstants()
    run_passes(model, [fold])
    assert fold.folded == 1
    folded = next(n for n in model.graph if n.outputs[0].name == "r")  # same name, now a Constant
    expected = {"Unsqueeze": np.array([[2, 3]]), "Concat": np.array([2, 3, 2, 3])}[op]
    np.testing.assert_array_equal(folded.attributes["value"].as_tensor().numpy(), expected)


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
    run_on_proto(model, [FoldConstants()])
    assert parse(model) == []
