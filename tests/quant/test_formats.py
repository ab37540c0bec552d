"""Roles, default formats and the one-line refusals of `export --quant` (no export runs here)."""

from __future__ import annotations

import pytest

from gemma4_compile.errors import ExportError
from gemma4_compile.model.presets import get_preset
from gemma4_compile.model.weights import expected_shapes
from gemma4_compile.quant.formats import (
    EMBED_ROWS,
    GRAPH_DQ,
    GRAPH_NBITS,
    LM_HEAD,
    QuantRequest,
    QuantSpec,
    parse_override,
    plan_quant,
    quant_refusal,
    role_of,
    splits_int8,
)


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


def test_defaults_quantize_attention_and_mlp_tables_and_lm_head_int8_and_keep_the_rest():
    names = sorted(expected_shapes(get_preset("tiny-e2b")))
    q = plan_quant(QuantRequest("int4"), names, "fp32")
    assert q.roles["attn_q"] == q.roles["mlp_down"] == "int4" and q.roles["lm_head"] == "int8"
    assert q.roles["ple_table"] == q.roles["embed"] == "int8" and q.roles["ple_proj"] == "fp32"
    spec = get_preset("tiny-e2b")
    linears = 7 * spec.num_hidden_layers - sum(not p.owns_cache for p in spec.layers) * 2
    assert len(q.tensors) == linears + 3  # + the LM head's and the embed graph's copies, the PLE table
    assert q.tensors[LM_HEAD] == q.tensors[EMBED_ROWS] == q.tensors["embed_tokens_per_layer.weight"] == "int8"
    assert sorted(q.row_tables) == [EMBED_ROWS, "embed_tokens_per_layer.weight"]
    assert q.graph_of(EMBED_ROWS) == GRAPH_DQ and q.graph_of(LM_HEAD) == q.graph == GRAPH_NBITS
    assert "layers.0.per_layer_projection.weight" not in q.tensors
    kept = plan_quant(QuantRequest("int8", 64, ("lm_head", "mlp_up")), names, "fp32")
    assert LM_HEAD not in kept.tensors and kept.roles["mlp_up"] == "fp32"
    assert QuantSpec.from_dict(kept.to_dict()) == kept


def _refusal(fmt: str, block: int | None = None, overrides=(), method: str = "rtn") -> str | None:
    return quant_refusal(QuantRequest(fmt, block, overrides=tuple(overrides), method=method))


def test_refusals_are_one_line_and_come_before_any_work():
    assert _refusal("int4") is None and _refusal("fp8") is None and _refusal("nvfp4") is None
    assert "applies to int4/int8" in _refusal("fp8", method="mse")
    assert "unknown --quant-method" in _refusal("int4", method="gptq")
    assert "--block-size" in _refusal("int8", 48)
    assert "fixed by the format" in _refusal("nvfp4", 64)
    assert _refusal("nvfp4", 64, overrides=[("lm_head", "int4")]) is None  # the block of the int4 override
    assert _refusal("int4", 128) is None
    for reason in (_refusal("nvfp4", 32), _refusal("int4", 48), _refusal("fp8", method="mse")):
        assert "\n" not in reason
    with pytest.raises(ExportError, match="unknown --quant-keep role 'norm'"):
        plan_quant(QuantRequest("int4", keep=("norm",)), [], "fp32")


def test_float_formats_take_the_dequantize_form_and_their_block_defaults():
    names = sorted(expected_shapes(get_preset("tiny-e2b")))
    fp8 = plan_quant(QuantRequest("fp8"), names, "fp32")
    assert fp8.graph == "DequantizeLinear" and fp8.block_size == 128 and fp8.min_sm == 89
    nv = plan_quant(QuantRequest("nvfp4"), names, "fp16")
    assert nv.block_of("nvfp4") == 16 and nv.block_of("int8") == 32 and nv.min_sm == 120  # the int8 LM head
    assert plan_quant(QuantRequest("int4"), names, "fp32").min_sm == 0
    assert QuantSpec.from_dict(nv.to_dict()) == nv and "global" in nv.to_dict()["scales"]


def test_overrides_give_a_role_its_own_format():
    names = sorted(expected_shapes(get_preset("tiny-e2b")))
    request = QuantRequest("int4", overrides=(parse_override("lm_head=int4"), parse_override("attn_v=int8")))
    q = plan_quant(request, names, "fp32")
    assert q.roles["lm_head"] == "int4" and q.roles["attn_v"] == "int8" and q.roles["attn_q"] == "int4"
    assert q.tensors[LM_HEAD] == "int4" and q.graph == "com.microsoft.MatMulNBits"
    mixed = plan_quant(QuantRequest("int4", overrides=(("mlp_down", "fp8"),)), names, "fp32")
    assert mixed.graph == "DequantizeLinear"  # one graph form per export: MatMulNBits has no fp8
    for bad, message in [
        ("lm_head", "not ROLE=FORMAT"),
        ("router=int8", "cannot be quantized in this version"),
        ("ple_table=int4", "gathered table, stored as int8 rows only"),
        ("attn=int4", "unknown role"),
        ("attn_q=int2", "unknown format"),
    ]:
        with pytest.raises(ExportError, match=message):
            parse_override(bad)
    with pytest.raises(ExportError, match="both kept"):
        plan_quant(QuantRequest("int4", keep=("lm_head",), overrides=(("lm_head", "int4"),)), names, "fp32")


def test_only_onnxruntime_8bit_weights_at_fp32_activations_are_split():
    assert splits_int8(GRAPH_NBITS, "int8", 0) and splits_int8(GRAPH_NBITS, "int8", 1)
    assert not splits_int8(GRAPH_NBITS, "int8", 4)  # onnxruntime's int8-activation kernel handles 8 bits
    assert not splits_int8(GRAPH_NBITS, "int4", 0) and not splits_int8(GRAPH_DQ, "int8", 0)
    assert not splits_int8(GRAPH_DQ, "fp8", 0)
