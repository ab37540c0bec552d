"""The passes the engine builder runs before TensorRT parses a decoder: rename, MoE split, aot marking."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from gemma4_compile.errors import BuildError
from gemma4_compile.passes import MarkAot, RenameShadowedOps, SplitMoE, plugin_lookup, run_passes
from gemma4_compile.plugins.moe_stages import STAGES

# gemma4::Attention (a name TensorRT's parser has a built-in importer for) next to one it does not know.
SHADOWED = """
<ir_version: 10, opset_import: ["" : 20, "gemma4" : 1]>
g (float[N, 4] x) => (float[N, 4] y, float[N, 4] z) {
    a = gemma4.Attention <plugin_namespace = "gemma4", plugin_version = "1"> (x)
    y = gemma4.Attention (a)
    z = gemma4.Other (x)
}
<domain: "gemma4", opset_import: ["" : 20]>
Attention (t) => (u) {
    u = Mul (t, t)
}
<domain: "gemma4", opset_import: ["" : 20]>
Other (t) => (u) {
    u = Neg (t)
}
"""


def _run(model: ir.Model, **feeds: np.ndarray) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_shadowed_custom_ops_are_renamed_with_a_copy_of_their_function():
    model = ir.from_onnx_text(SHADOWED)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    before = _run(model, x=x)
    rename = RenameShadowedOps(has_importer={"Attention"}.__contains__, has_plugin=plugin_lookup(()))
    run_passes(model, [rename])
    assert rename.renamed == {"gemma4::Attention": "gemma4_Attention"}
    assert [n.op_type for n in model.graph] == ["gemma4_Attention", "gemma4_Attention", "Other"]
    assert sorted(f.name for f in model.functions.values()) == ["Attention", "Other", "gemma4_Attention"]
    for a, b in zip(before, _run(model, x=x)):
        np.testing.assert_array_equal(a, b)


def test_a_node_with_a_registered_plugin_keeps_its_name():
    model = ir.from_onnx_text(SHADOWED)
    creators = {
        ("Attention", "1", "gemma4")
    }  # the first node names its plugin; the second falls back on its domain
    rename = RenameShadowedOps({"Attention"}.__contains__, plugin_lookup(creators))
    run_passes(model, [rename])
    assert rename.renamed == {} and [n.op_type for n in model.graph] == ["Attention", "Attention", "Other"]


def test_plugin_nodes_are_marked_aot():
    model = ir.from_onnx_text(SHADOWED)
    mark = MarkAot(plugin_lookup({("Other", "1", "gemma4")}))
    run_passes(model, [mark])
    assert mark.marked == 1
    assert [n.attributes["aot"].as_int() if "aot" in n.attributes else None for n in model.graph] == [
        None,
        None,
        1,
    ]
    run_passes(model, [mark])
    assert mark.marked == 1  # already marked: counted, not added twice


def _moe_model(with_weights: bool = True) -> ir.Model:
    graph = """
    <ir_version: 10, opset_import: ["" : 20, "gemma4" : 1]>
    g (float[5, 64] x, float[5, 16] logits, float[16] scale, float[16, 64, 64] gate_up, float[16, 64, 32] down)
      => (float[5, 64] y) {
        y = gemma4.MoE <top_k = 4> (x, logits, scale, gate_up, down)
    }
    """
    model = ir.from_onnx_text(graph)
    if not with_weights:
        for value in model.graph.inputs[2:]:
            value.shape = ir.Shape(["E", *value.shape[1:]])
    return model


def test_moe_splits_into_seven_stages_wired_through_the_kernel_buffers():
    model = _moe_model()
    split = SplitMoE(tokens_hint=4096)
    run_passes(model, [split])
    nodes = list(model.graph)
    assert split.split == 1 and [n.op_type for n in nodes] == [s.op_type for s in STAGES]
    produced = {"x", "logits", "scale", "gate_up", "down"}
    for node in nodes:
        assert {v.name for v in node.inputs} <= produced, f"{node.name} reads a tensor no earlier node wrote"
        produced |= {v.name for v in node.outputs}
        fields = {k: a.value for k, a in node.attributes.items()}
        assert fields == {
            "top_k": 4,
            "num_experts": 16,
            "rows_per_expert": 1024,
            "plugin_namespace": "gemma4",
            "plugin_version": "1",
            "aot": 1,
        }
    assert model.graph.outputs[0].producer() is nodes[-1] and model.graph.outputs[0].name == "y"
    run_passes(model, [split])
    assert split.split == 0  # nothing left to split


def test_moe_split_needs_the_expert_count():
    model = _moe_model(with_weights=False)
    with pytest.raises(BuildError, match="MoE node '.*': cannot tell the number of experts"):
        run_passes(model, [SplitMoE()])
    split = SplitMoE(num_experts=16)
    run_passes(model, [split])
    assert split.split == 1


def test_run_on_proto_keeps_the_bytes_of_what_no_pass_touched():
    """The exporter lowers its saved proto through run_on_proto; re-exports must stay byte-identical."""
    import onnx

    from gemma4_compile.passes import run_on_proto

    proto = onnx.parser.parse_model(SHADOWED)
    proto.doc_string = ""  # as the exporter writes it
    before = proto.SerializeToString()
    run_on_proto(proto, [MarkAot(plugin_lookup(()))])
    assert proto.SerializeToString() == before
