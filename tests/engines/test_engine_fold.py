"""Why the engine builder folds constants: TensorRT-RTX's parser rejects the graph without FoldConstants."""

from __future__ import annotations

import onnx
import pytest

from gemma4_compile.passes import FoldConstants, run_on_proto

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
