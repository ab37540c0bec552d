"""Optimization profiles derived from export.json (pure; no TensorRT)."""

from __future__ import annotations

import json

import pytest

from gemma4_compile.engines import ProfileLimits, derive_profiles, read_export
from gemma4_compile.engines.profiles import profile_index, tokens_per_step
from gemma4_compile.errors import BuildError, Gemma4CompileError


def test_prefill_and_decode_profiles(synthetic_exports):
    export = read_export(synthetic_exports["fp16"])
    prefill, decode = derive_profiles(export, ProfileLimits(max_batch=3, max_seq=32))
    assert (prefill.name, decode.name) == ("prefill", "decode")
    names = [t.name for t in export.graphs["decoder"].inputs]
    assert [s.name for s in prefill.inputs] == names == [s.name for s in decode.inputs]

    emb = prefill.shape("inputs_embeds")
    assert (emb.min, emb.opt, emb.max) == ((1, 1, 32), (1, 16, 32), (3, 32, 32))
    assert decode.shape("inputs_embeds").max == (3, 1, 32)  # decode: one token per row
    assert prefill.shape("per_layer_tokens").max == (3, 32, 3, 4)
    assert prefill.shape("past_len").max == decode.shape("seq_len").max == (3,)

    sliding = prefill.shape("past_key_values.0.key")  # sliding: exactly W slots, in both profiles
    assert sliding.min == (1, 2, 4, 8) and sliding.max == (3, 2, 4, 8)
    assert decode.shape("past_key_values.0.value").max == (3, 2, 4, 8)
    glob = decode.shape("past_key_values.1.key")  # global: 1 .. max_seq slots
    assert (glob.min, glob.opt, glob.max) == ((1, 1, 1, 8), (1, 1, 16, 8), (3, 1, 32, 8))


def test_max_seq_defaults_to_the_export_and_is_bounded_by_it(synthetic_exports):
    export = read_export(synthetic_exports["fp16"])
    (prefill,) = derive_profiles(export, ProfileLimits(profiles=("prefill",)))
    assert prefill.shape("inputs_embeds").max[1] == export.max_seq_len == 64
    with pytest.raises(BuildError, match=r"max_seq must be in 1..64 \(the export's max_seq_len\), got 65"):
        derive_profiles(export, ProfileLimits(max_seq=65))
    with pytest.raises(BuildError, match="max_batch must be >= 1"):
        derive_profiles(export, ProfileLimits(max_batch=0))
    with pytest.raises(BuildError, match="unknown profiles"):
        derive_profiles(export, ProfileLimits(profiles=("chunked",)))


def test_undefined_symbolic_dim_is_refused(synthetic_exports, tmp_path):
    raw = json.loads((synthetic_exports["fp16"] / "export.json").read_text())
    raw["graphs"]["decoder"]["inputs"][0]["shape"] = ["batch", "sequence", "hidden"]
    for name in ("embed.onnx", "decoder.onnx", "embed.onnx.data", "decoder.onnx.data"):
        (tmp_path / name).write_bytes((synthetic_exports["fp16"] / name).read_bytes())
    (tmp_path / "export.json").write_text(json.dumps(raw))
    with pytest.raises(BuildError, match="decoder input 'inputs_embeds' has dimension 'hidden'"):
        derive_profiles(read_export(tmp_path), ProfileLimits())


def test_profile_roundtrip_and_choice(synthetic_exports):
    profiles = derive_profiles(read_export(synthetic_exports["fp16"]), ProfileLimits(max_seq=16))
    assert tuple(type(p).from_dict(p.to_dict()) for p in profiles) == profiles
    assert profile_index(profiles, 1) == 1 and profile_index(profiles, 5) == 0
    assert (
        tokens_per_step(profiles) == 8 and tokens_per_step(profiles[1:]) == 1
    )  # prefill opt (1, 8); decode (1, 1)
    with pytest.raises(Gemma4CompileError, match="only a decode profile"):
        profile_index(profiles[1:], 5)


def test_export_json_problems_are_build_errors(tmp_path):
    with pytest.raises(BuildError, match=r"no export\.json"):
        read_export(tmp_path)
    (tmp_path / "export.json").write_text(json.dumps({"format": "other", "version": 3}))
    with pytest.raises(
        BuildError, match="expected format 'gemma4-compile/export' version 1, found 'other' version 3"
    ):
        read_export(tmp_path)
