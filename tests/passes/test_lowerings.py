"""The lowering registry and the gqa pass on a graph of bare attention nodes (numerics: tests/export/test_lowering.py)."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from gemma4_compile.model.presets import get_preset
from gemma4_compile.passes import LOWERINGS, lowering_refusal, run_passes


def _attention_graph(layers: int) -> ir.Model:
    nodes = "\n".join(
        f"    h{i + 1} = gemma4.SlidingWindowAttention <window = 8> (h{i})" for i in range(layers)
    )
    return ir.from_onnx_text(f"""
    <ir_version: 10, opset_import: ["" : 20, "gemma4" : 1]>
    g (float[N] h0) => (float[N] h{layers}) {{
    {nodes}
    }}
    <domain: "gemma4", opset_import: ["" : 20]>
    SlidingWindowAttention <window> (t) => (u) {{
        u = Identity (t)
    }}
    """)


def test_gqa_gives_every_layer_its_attributes_and_swaps_the_body():
    spec = get_preset("tiny-e2b")
    model = _attention_graph(spec.num_hidden_layers)
    run_passes(model, [LOWERINGS["gqa"].make(spec)])
    for node, plan in zip(model.graph, spec.layers, strict=True):
        assert node.attributes["num_heads"].as_int() == spec.num_attention_heads
        assert node.attributes["kv_num_heads"].as_int() == plan.num_kv_heads
        assert node.attributes["local_window_size"].as_int() == (plan.window if plan.window > 0 else -1)
    (function,) = model.functions.values()
    assert "GroupQueryAttention" in {n.op_type for n in function}
    assert model.opset_imports["com.microsoft"] == 1


def test_gqa_requires_one_attention_node_per_layer():
    spec = get_preset("tiny-e2b")
    with pytest.raises(ir.passes.PreconditionError, match="expected one attention node per layer, found 1"):
        LOWERINGS["gqa"].make(spec)(_attention_graph(1))


def test_registry_names_descriptions_and_runner_limits():
    assert list(LOWERINGS) == ["gqa"] and all(lw.description and lw.name == n for n, lw in LOWERINGS.items())
    assert lowering_refusal(None, 2, 3, True) is None
    assert lowering_refusal("gqa", 1, 3, True) is None and lowering_refusal("gqa", 2, 1, True) is None
    assert "cannot prefill a batch" in lowering_refusal("gqa", 2, 3, True)
