"""Spec parsing, presets and the per-layer plan."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import Gemma4TextConfig

from gemma4_compile.errors import SpecError
from gemma4_compile.model.config import FULL, SLIDING, Gemma4Spec
from gemma4_compile.model.presets import PRESETS, TINY_PRESETS, get_preset

# Values from docs/architecture.md: KV sharing, MLP, released configurations.
RELEASED = {
    "e2b": dict(
        layers=35,
        full=[4, 9, 14, 19, 24, 29, 34],
        caches=15,
        producers={"sliding": 13, "global": 14},
        widths={6144, 12288},
        kv=(1, 1),
        v_proj=True,
    ),
    "e4b": dict(
        layers=42,
        full=[5, 11, 17, 23, 29, 35, 41],
        caches=24,
        producers={"sliding": 22, "global": 23},
        widths={10240},
        kv=(2, 2),
        v_proj=True,
    ),
    "26b-a4b": dict(
        layers=30, full=[5, 11, 17, 23, 29], caches=30, producers={}, widths={2112}, kv=(8, 2), v_proj=False
    ),
    "31b": dict(
        layers=60,
        full=list(range(5, 60, 6)),
        caches=60,
        producers={},
        widths={21504},
        kv=(16, 4),
        v_proj=False,
    ),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_presets_match_the_architecture_note(name):
    spec, want = PRESETS[name], RELEASED[name]
    plans = spec.layers
    assert len(plans) == want["layers"]
    assert [p.index for p in plans if p.kind == "global"] == want["full"]
    assert len(spec.cache_layers) == want["caches"]
    producers = {p.kind: p.kv_producer for p in plans if p.kv_producer is not None}
    assert producers == want["producers"]
    assert {p.mlp_width for p in plans} == want["widths"]
    sliding = next(p for p in plans if p.is_sliding)
    full = next(p for p in plans if not p.is_sliding)
    assert (sliding.num_kv_heads, full.num_kv_heads) == want["kv"]
    assert (sliding.head_dim, full.head_dim) == (256, 512)
    assert full.has_v_proj is want["v_proj"] and sliding.has_v_proj
    assert full.rope_rotary_dims == 128 and sliding.rope_rotary_dims == 256  # 64 rotating pairs of 512
    assert spec.final_logit_softcapping == 30.0


def test_e2b_double_wide_mlp_only_on_consumers():
    plans = PRESETS["e2b"].layers
    assert all(p.mlp_width == (12288 if p.index >= 15 else 6144) for p in plans)
    assert all(p.owns_cache == (p.index < 15) for p in plans)


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_presets_keep_the_big_siblings_structure(name):
    tiny, big = PRESETS[name], PRESETS[name.removeprefix("tiny-")]
    assert tiny.layer_types[-1] == FULL and 8 <= tiny.sliding_window <= 16
    assert tiny.head_dim != tiny.global_head_dim
    for field in (
        "attention_k_eq_v",
        "use_double_wide_mlp",
        "enable_moe_block",
        "has_ple",
        "final_logit_softcapping",
    ):
        assert getattr(tiny, field) == getattr(big, field), field
    assert bool(tiny.num_kv_shared_layers) == bool(big.num_kv_shared_layers)
    if tiny.attention_k_eq_v:
        assert tiny.num_global_key_value_heads < tiny.num_key_value_heads
    if tiny.enable_moe_block:
        assert tiny.top_k_experts < tiny.num_experts
    if tiny.num_kv_shared_layers:
        assert {p.kind for p in tiny.layers if p.kv_producer is not None} == {"sliding", "global"}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_round_trips_through_hf_config(name):
    spec = PRESETS[name]
    assert Gemma4Spec.from_hf_dict(spec.to_hf_config(multimodal=True)) == spec
    assert Gemma4Spec.from_hf_dict(spec.to_hf_config(multimodal=False)) == spec
    assert Gemma4Spec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_config_written_by_transformers_parses_to_the_same_plan(name):
    """transformers >= 5.16 writes the newer per_layer_config style; the plan must not change."""
    spec = PRESETS[name]
    text = spec.to_hf_text_config()
    hf = Gemma4TextConfig(
        **{k: v for k, v in text.items() if k not in ("model_type", "architectures", "dtype")}
    )
    parsed = Gemma4Spec.from_hf_dict(hf.to_dict())
    assert parsed.layers == spec.layers
    if "per_layer_config" in hf.to_dict():
        assert parsed.layer_overrides  # really the newer style


def _text(name="tiny-e2b", **changes):
    d = PRESETS[name].to_hf_text_config()
    d.update(changes)
    return d


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(hidden_size="64"), "hidden_size"),
        (dict(num_hidden_layers=True), "num_hidden_layers"),
        (dict(layer_types=[SLIDING] * 10), "layer_types"),
        (dict(layer_types=[SLIDING] * 9), "layer_types"),
        (dict(layer_types=[SLIDING] * 9 + ["chunked_attention"]), "layer_types"),
        (dict(num_kv_shared_layers=6, layer_types=[SLIDING] * 4 + [FULL] * 6), "num_kv_shared_layers"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(hidden_activation="silu"), "hidden_activation"),
        (dict(model_type="llama"), "model_type"),
        (dict(sliding_window=0), "sliding_window"),
    ],
)
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(SpecError, match=f"'{field}'"):
        Gemma4Spec.from_hf_dict(_text(**changes))


def test_moe_fields_are_checked():
    with pytest.raises(SpecError, match="'top_k_experts'.*exceeds"):
        Gemma4Spec.from_hf_dict(_text("tiny-26b-a4b", top_k_experts=9))
    with pytest.raises(SpecError, match="'num_experts'"):
        Gemma4Spec.from_hf_dict(_text("tiny-26b-a4b", num_experts=None))


def test_multimodal_config_without_text_config_is_rejected():
    with pytest.raises(SpecError, match="'text_config'"):
        Gemma4Spec.from_hf_dict({"model_type": "gemma4"})


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(Exception, match="tiny-e2b"):
        get_preset("e3b")


def test_spec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["tiny-e2b"].hidden_size = 1
