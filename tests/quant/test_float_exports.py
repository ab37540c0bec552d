"""fp8 and nvfp4 exports (the DequantizeLinear form at every dtype): the graph, the correctness gate against the
fake-quant reference at fp32 tolerances (onnxruntime runs fp8 natively; nvfp4 through ort_fp4.py, which decodes
the FP4 codes with onnx-ir, not with our packer), broken packings that must fail it, and TensorRT-RTX engines."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from quant_support import swap_nibbles

from gemma4_compile.export import ExportManifest
from gemma4_compile.validate.validate import validate

STEPS = 4  # as test_quant_export.py: the long default prompt already wraps the sliding window


@pytest.mark.parametrize("preset", ["tiny-e2b", "tiny-31b"])
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_ort_matches_the_fake_quant_reference_at_fp32_tolerances(make_quant_export, preset, fmt):
    report = validate(make_quant_export(preset, fmt), steps=STEPS, write=False)
    assert report.passed, report.failure_message()


def test_swapped_fp4_nibbles_fail_the_gate(make_quant_export, corrupt):
    out = corrupt(make_quant_export("tiny-e2b", "nvfp4"), onnx.TensorProto.FLOAT4E2M1, swap_nibbles)
    assert not validate(out, steps=STEPS, write=False).passed


def test_fp8_scales_in_the_wrong_order_fail_the_gate(make_quant_export, corrupt):
    """Each tensor's scales read back to front: the scale-layout bug (blocks of one row against another's)."""

    def reversed_floats(raw: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(raw.view(np.float32)[::-1]).view(np.uint8)

    out = corrupt(make_quant_export("tiny-e2b", "fp8"), onnx.TensorProto.FLOAT, reversed_floats, "_scales")
    assert not validate(out, steps=STEPS, write=False).passed


def _dq(export) -> list[ir.Node]:
    model = ir.load(export / "decoder.onnx")
    return model, [n for n in model.graph if n.op_type == "DequantizeLinear"]


def test_graphs_are_standard_blockwise_dequantize(make_quant_export):
    fp8 = make_quant_export("tiny-e2b", "fp8", dtype="fp16")
    model, nodes = _dq(fp8)
    assert model.opset_imports[""] == 21 and ExportManifest.load(fp8).quant.block_size == 128
    kinds = sorted(n.inputs[0].dtype.name for n in nodes)
    assert kinds.count("INT8") == 1 and set(kinds) == {"FLOAT8E4M3FN", "INT8"}  # the LM head stays int8
    assert all(n.inputs[1].dtype == ir.DataType.FLOAT16 for n in nodes)

    nv = make_quant_export("tiny-e2b", "nvfp4", dtype="bf16")  # the export the sm120 engine test builds
    model, nodes = _dq(nv)
    assert model.opset_imports[""] == 23 and all(f.opset_imports[""] == 23 for f in model.functions.values())
    fp4 = [n for n in nodes if n.inputs[0].dtype == ir.DataType.FLOAT4E2M1]
    quant = ExportManifest.load(nv).quant
    assert fp4 and len(fp4) == len(quant.tensors) - 1 - len(quant.row_tables)  # the int8 LM head, the tables
    for node in fp4:
        assert node.attributes["block_size"].as_int() == 16 and node.attributes["axis"].as_int() == 1
        inner = node.inputs[1].producer()
        scales, glob = inner.inputs
        assert scales.dtype == ir.DataType.FLOAT8E4M3FN and glob.shape.rank() == 0
        assert glob.dtype == ir.DataType.BFLOAT16 and float(glob.const_value.numpy()) > 0
    onnx.checker.check_model(str(nv / "decoder.onnx"))


def _float_weight_bytes(export) -> int:
    model = ir.load(export / "decoder.onnx")
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


@pytest.mark.rtx
@pytest.mark.parametrize(
    "fmt,dtype,target,ratio",
    [
        ("int4", "fp16", "sm89", 0.45),
        ("fp8", "fp16", "sm89", 0.65),
        ("int4", "bf16", "sm120", 0.45),
        ("fp8", "bf16", "sm120", 0.65),
        ("nvfp4", "bf16", "sm120", 0.45),
    ],
)
def test_tensorrt_rtx_builds_quantized_engines_with_smaller_weights(
    make_quant_export, make_export, fmt, dtype, target, ratio
):
    """Engine weights against the unquantized export's float bytes (no second engine build): int4/nvfp4 keep
    about a third, fp8 about half (the int8 LM head, norms and PLE projections stay)."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed")
    from gemma4_compile.engines import build_engines

    export = make_quant_export("tiny-e2b", fmt, dtype=dtype)
    (art,) = build_engines(export, [target], max_batch=1, max_seq=32, opt_level=0, profiles=("decode",))
    assert art.manifest.weight_format == fmt and art.engine_path.stat().st_size > 100_000
    weights = art.manifest.device_memory["weights_bytes"]
    plain = _float_weight_bytes(make_export("tiny-e2b", dtype))
    assert weights < ratio * plain, ((art.dir / "build.log").read_text()[-2000:], weights, plain)


@pytest.mark.rtx
@pytest.mark.parametrize("fmt,target", [("nvfp4", "sm89"), ("fp8", "sm86")])
def test_formats_a_target_lacks_are_refused_before_any_build(make_quant_export, fmt, target):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed")
    from gemma4_compile.engines import build_engines
    from gemma4_compile.errors import BuildError

    export = make_quant_export("tiny-e2b", fmt, dtype="bf16" if fmt == "nvfp4" else "fp16")
    with pytest.raises(BuildError, match=f"{target} cannot run {fmt} weights"):
        build_engines(export, [target])
    assert not (export / "engines" / target).exists()
