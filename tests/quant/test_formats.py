"""Roles, default formats and the one-line refusals of `export --quant` (no export runs here)."""

from __future__ import annotations

import pytest

from gemma4_compile.errors import ExportError
from gemma4_compile.model.presets import get_preset
from gemma4_compile.model.weights import expected_shapes
from gemma4_compile.quant.formats import LM_HEAD, QuantSpec, plan_quant, quant_refusal, role_of


def test_every_2d_weight_of_every_tiny_preset_has_a_role_and_norms_have_none():
    for preset in ("tiny-e2b", "tiny-26b-a4b"):
        for name, shape in expected_shapes(get_preset(preset)).items():
            role = role_of(name)
            if len(shape) >= 2:
                assert role is not None, name
            else:
                assert role is None, name
    assert role_of("layers.3.self_attn.v_proj.weight") == "attn_v"
    assert role_of("layers.0.mlp.down_proj.weight") == "mlp_down"
    assert role_of("per_layer_model_projection.weight") == "ple_proj"
    assert (
        role_of("embed_tokens.weight") == "lm_head"
        and role_of("embed_tokens_per_layer.weight") == "ple_table"
    )


def test_defaults_quantize_attention_and_mlp_lm_head_int8_and_keep_the_rest():
    names = sorted(expected_shapes(get_preset("tiny-e2b")))
    q = plan_quant("int4", 32, (), names, "fp32")
    assert q.roles["attn_q"] == q.roles["mlp_down"] == "int4" and q.roles["lm_head"] == "int8"
    assert q.roles["ple_proj"] == q.roles["ple_table"] == q.roles["embed"] == "fp32"
    spec = get_preset("tiny-e2b")
    assert len(q.tensors) == 7 * spec.num_hidden_layers - sum(not p.owns_cache for p in spec.layers) * 2 + 1
    assert q.tensors[LM_HEAD] == "int8" and "layers.0.per_layer_projection.weight" not in q.tensors
    kept = plan_quant("int8", 64, ("lm_head", "mlp_up"), names, "fp32")
    assert LM_HEAD not in kept.tensors and kept.roles["mlp_up"] == "fp32"
    assert QuantSpec.from_dict(kept.to_dict()) == kept


def test_refusals_are_one_line_and_come_before_any_work():
    assert "not supported yet" in quant_refusal("fp8", "fp32", False, 32)
    assert "not supported yet" in quant_refusal("nvfp4", "fp32", False, 32)
    assert quant_refusal("int4", "bf16", False, 32) is None  # the TensorRT form (DequantizeLinear)
    assert "MoE experts" in quant_refusal("int4", "fp32", True, 32)
    assert "--block-size" in quant_refusal("int8", "fp32", False, 48)
    assert quant_refusal("int4", "fp32", False, 128) is None
    for reason in (quant_refusal(q, "fp32", True, 32) for q in ("fp8", "int4")):
        assert "\n" not in reason
    with pytest.raises(ExportError, match="unknown --quant-keep role 'norm'"):
        plan_quant("int4", 32, ("norm",), [], "fp32")
