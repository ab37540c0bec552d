"""FuseAttention: the vision tower's standard-op attention as one ONNX `Attention` node (what TensorRT gets).

The fused graph is evaluated by onnx's reference evaluator (onnxruntime's CPU `Attention` refuses the [N, 1, 1, P]
key mask) and compared with the exported graph on onnxruntime, on two images, one padded (its padded keys must
stay masked). Tolerances on soft tokens of magnitude ~3: fp32 1e-5 (evaluation order only); fp16 2e-2, about
5 ulp at that magnitude (the fused node computes its softmax in fp16 here, where the export's fp32 island did
not; the padded keys' bias is -inf once cast to fp16, and the outputs must stay finite).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx.external_data_helper import load_external_data_for_model
from onnx.reference import ReferenceEvaluator

from gemma4_compile import passes
from gemma4_compile.model.presets import VISION_PRESETS
from gemma4_compile.model.vision import patch_positions

PRESET = "tiny-e2b"  # its export also holds the audio tower


def fused(path, drop_mask: bool = False) -> tuple[onnx.ModelProto, int]:
    fuse = passes.FuseAttention()
    model = passes.run_passes(ir.load(str(path)), [fuse])
    proto = ir.serde.serialize_model(model)
    for node in proto.graph.node:
        if node.op_type == "Attention":  # TensorRT's attribute; the reference evaluator rejects unknown ones
            keep = [a for a in node.attribute if a.name != "TRT_decomposable"]
            del node.attribute[:]
            node.attribute.extend(keep)
            if drop_mask:
                del node.input[3:]
    load_external_data_for_model(proto, str(path.parent))
    return proto, fuse.fused


TOLERANCE = {"fp32": 1e-5, "fp16": 2e-2}


def run_vision(make_vision_export, dtype: str):
    _, out = make_vision_export(PRESET, dtype)
    rng = np.random.default_rng(0)
    patches = 36
    positions = np.stack([patch_positions(6, 6, patches).numpy(), patch_positions(3, 5, patches).numpy()])
    feeds = {
        "pixel_values": rng.standard_normal((2, patches, 768)).astype(np.dtype(dtype.replace("fp", "float"))),
        "image_position_ids": positions,
    }
    session = ort.InferenceSession(str(out / "vision.onnx"), providers=["CPUExecutionProvider"])
    return out, feeds, session.run(None, feeds)


@pytest.fixture(scope="module")
def vision(make_vision_export):
    return run_vision(make_vision_export, "fp32")


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_each_vision_layer_becomes_one_attention_node_with_the_same_soft_tokens(make_vision_export, dtype):
    out, feeds, want = run_vision(make_vision_export, dtype)
    proto, count = fused(out / "vision.onnx")
    ops = [n.op_type for n in proto.graph.node]
    assert count == VISION_PRESETS[PRESET].num_hidden_layers == ops.count("Attention")
    assert "Softmax" not in ops
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {23}
    with np.errstate(over="ignore"):  # fp16 only: the padded keys' bias becomes -inf, as intended
        got = ReferenceEvaluator(proto).run(None, feeds)
    assert np.isfinite(got[0]).all()
    np.testing.assert_allclose(
        got[0].astype(np.float32), want[0].astype(np.float32), atol=TOLERANCE[dtype], rtol=0
    )
    np.testing.assert_array_equal(got[1], want[1])  # the soft-token counts


def test_without_the_key_mask_the_padded_image_changes(vision):
    """Negative control: the mask carries the padding; dropping it must move the padded image's tokens."""
    out, feeds, want = vision
    got = ReferenceEvaluator(fused(out / "vision.onnx", drop_mask=True)[0]).run(None, feeds)
    assert np.abs(got[0][1] - want[0][1]).max() > 1e-2


def test_attention_with_a_logit_cap_is_left_alone(vision):
    """The audio tower caps its logits (Tanh between the MatMul and the Softmax): not this pattern."""
    out, _, _ = vision
    _, count = fused(out / "audio.onnx")
    assert count == 0
