"""Our audio tower against transformers' (`Gemma4Model.get_audio_features`, eager) on the same random checkpoint.

tiny-e2b's tower keeps every feature of the released one (clipped linears, blocks of 12 with 12 keys per
query, logit cap 50, relative positions, causal depthwise conv) at width 32. Norm weights sit away from 1,
clip bounds are tight enough to clamp and `per_dim_scale` is not 0 (model/checkpoint.py); the negative
controls show that each of those, a weight x1.05 and a 13-key window, fails the check.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import Gemma4ForConditionalGeneration

from gemma4_compile.cli import main
from gemma4_compile.errors import SpecError
from gemma4_compile.model.audio import Gemma4Audio
from gemma4_compile.model.audio_config import AudioSpec
from gemma4_compile.model.audio_preprocess import soft_token_count
from gemma4_compile.model.audio_weights import load_audio_model
from gemma4_compile.model.checkpoint import write_random_checkpoint
from gemma4_compile.model.presets import AUDIO_PRESETS, PRESETS, VISION_PRESETS
from gemma4_compile.model.vision import CLIP_BOUNDS
from gemma4_compile.model.vision_merge import merge_image_soft_tokens, placeholders_to_pad
from gemma4_compile.model.weights import CheckpointReader, load_model

FP32_ATOL = 1e-5  # the bound on soft tokens (values ~3); observed <= 9e-6
AUDIO_KEYS = ("model.audio_tower.", "model.embed_audio.")
# (frames, valid frames per clip): 2 soft tokens; 10 (inside one attention block); 51 (five blocks, a
# partial last one) with the second clip right-padded past several blocks; 25 with an odd length
CASES = {
    "short": (7, (7, 3)),
    "one block": (40, (40, 29)),
    "five blocks, padded": (203, (203, 110)),
    "odd length": (97, (97, 97)),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "tiny-e2b"
    write_random_checkpoint(
        PRESETS["tiny-e2b"],
        path,
        dtype=torch.float32,
        vision=VISION_PRESETS["tiny-e2b"],
        audio=AUDIO_PRESETS["tiny-e2b"],
    )
    return path


@pytest.fixture(scope="module")
def full_hf(checkpoint):
    """transformers' Gemma4ForConditionalGeneration (eager) and its loading info, loaded once."""
    hf, info = Gemma4ForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    return hf.eval(), info


@pytest.fixture(scope="module")
def towers(checkpoint, full_hf):
    """(ours, transformers' Gemma4Model, its loading info)."""
    hf, info = full_hf
    return load_audio_model(checkpoint), hf.model, info


def clips(frames: int, valid: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random log-mel-like features [B, T, 128], zero on the padding frames as the extractor pads, and mask."""
    g = torch.Generator().manual_seed(seed + frames)
    mask = torch.arange(frames)[None] < torch.tensor(valid)[:, None]
    features = (torch.randn(len(valid), frames, 128, generator=g) * 2 - 3) * mask[..., None]
    return features, mask


def reference(hf, features, mask) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = hf.get_audio_features(features, mask)
    return out.pooler_output, out.attention_mask


def assert_soft_tokens_match(ours, hf, features, mask, atol: float = FP32_ATOL) -> None:
    """Same validity; valid rows equal transformers' soft tokens, invalid rows are zero."""
    ref, ref_valid = reference(hf, features, mask)
    with torch.no_grad():
        soft, valid = ours(features, mask)
    assert torch.equal(valid, ref_valid), f"validity {valid.sum(-1).tolist()} vs {ref_valid.sum(-1).tolist()}"
    assert not soft[~valid].any()
    diff = (soft - ref)[valid].abs().max().item()
    assert diff <= atol, f"max |Δ| {diff:.3g} exceeds {atol}"


def test_transformers_loads_the_checkpoint_with_no_missing_or_unexpected_keys(towers):
    _, hf, info = towers
    assert not any(info.values()), {k: v for k, v in info.items() if v}
    assert hf.audio_tower is not None and hf.vision_tower is not None


@pytest.mark.parametrize("case", CASES)
def test_soft_tokens_match_transformers(towers, case):
    ours, hf, _ = towers
    features, mask = clips(*CASES[case])
    assert_soft_tokens_match(ours, hf, features, mask)
    assert ours(features, mask)[1].sum(-1).tolist() == [soft_token_count(v) for v in CASES[case][1]]


def test_every_row_matches_transformers_even_with_a_hole_in_the_mask(towers):
    """The tower's hidden states before the projector, padding rows included: the mask path (padding keys,
    block padding, fully masked rows) is transformers' exactly, not only on the rows that are used."""
    ours, hf, _ = towers
    features, mask = clips(100, (100, 60), seed=1)
    mask[0, 20:30] = False
    with torch.no_grad():
        ref = hf.audio_tower(features, mask).last_hidden_state
        hidden, _ = ours.audio_tower(features, mask)
    diff = (hidden - ref).abs().max().item()
    assert diff <= FP32_ATOL, f"max |Δ| {diff:.3g} exceeds {FP32_ATOL}"


def _with_spec(model: Gemma4Audio, **changes) -> Gemma4Audio:
    other = Gemma4Audio(dataclasses.replace(model.spec, **changes))
    other.load_state_dict(model.state_dict())
    return other.eval()


def _perturbed(checkpoint, edit) -> Gemma4Audio:
    model = load_audio_model(checkpoint)
    with torch.no_grad():
        result = edit(model)
    return result if isinstance(result, Gemma4Audio) else model


NEGATIVE_CONTROLS = {
    "an audio weight x1.05": lambda m: m.audio_tower.layers[1].feed_forward2.ffw_layer_1.linear.weight.mul_(
        1.05
    ),
    "clip bounds dropped": lambda m: [
        getattr(mod, b).fill_(float("inf") if b.endswith("max") else -float("inf"))
        for mod in m.modules()
        if getattr(mod, "clip", False)
        for b in CLIP_BOUNDS
    ],
    "norm weight read as 1 + w": lambda m: m.audio_tower.layers[0].norm_post_attn.weight.add_(1),
    "per_dim_scale ignored": lambda m: m.audio_tower.layers[0].self_attn.per_dim_scale.zero_(),
    "relative positions dropped": lambda m: m.audio_tower.layers[1].self_attn.relative_k_proj.weight.zero_(),
    "13 keys per query (Gemma 3n's window)": lambda m: _with_spec(m, attention_context_left=14),
    "no logit cap": lambda m: _with_spec(m, attention_logit_cap=1e6),
}


@pytest.mark.parametrize("control", NEGATIVE_CONTROLS)
def test_negative_controls_fail_the_parity_check(towers, checkpoint, control):
    _, hf, _ = towers
    bad = _perturbed(checkpoint, NEGATIVE_CONTROLS[control])
    features, mask = clips(*CASES["five blocks, padded"])
    with pytest.raises(AssertionError, match="exceeds"):
        assert_soft_tokens_match(bad, hf, features, mask)


def test_audio_weights_are_deterministic_and_scales_away_from_defaults(tmp_path, checkpoint):
    spec = PRESETS["tiny-e2b"]
    write_random_checkpoint(spec, tmp_path / "again", dtype=torch.float32, audio=AUDIO_PRESETS["tiny-e2b"])
    a, b = CheckpointReader(checkpoint), CheckpointReader(tmp_path / "again")
    keys = [k for k in a.entries if k.startswith(AUDIO_KEYS)]
    assert all(torch.equal(a.load(a.entries[k]), b.load(b.entries[k])) for k in keys)
    norms = [k for k in keys if k.endswith("norm.weight") or ".norm_" in k]
    assert len(norms) == 2 + 2 * (
        2 * 2 + 2 + 3
    )  # subsampling LayerNorms; per layer 2 FF x 2, conv 2, block 3
    for k in norms:
        assert (a.load(a.entries[k]) - 1).abs().min() >= 0.1, k
    for k in (k for k in keys if k.endswith("per_dim_scale")):
        assert a.load(a.entries[k]).abs().max() > 0.1, k
    model = load_audio_model(checkpoint)
    q = model.audio_tower.layers[0].self_attn.q_proj
    assert -3 <= q.input_min < -1.5 and 1.5 < q.output_max <= 3


def test_text_and_vision_tensors_are_unchanged_by_the_audio_tower(tmp_path, checkpoint):
    write_random_checkpoint(
        PRESETS["tiny-e2b"], tmp_path / "noaudio", dtype=torch.float32, vision=VISION_PRESETS["tiny-e2b"]
    )
    without, both = CheckpointReader(tmp_path / "noaudio"), CheckpointReader(checkpoint)
    assert set(both.entries) - set(without.entries) == {k for k in both.entries if k.startswith(AUDIO_KEYS)}
    assert all(torch.equal(without.load(e), both.load(both.entries[k])) for k, e in without.entries.items())
    assert json.loads((tmp_path / "noaudio/config.json").read_text())["audio_config"] is None


@pytest.mark.parametrize(
    ("preset", "text_only", "has_audio"),
    [("tiny-e4b", False, True), ("tiny-e4b", True, False), ("tiny-31b", False, False)],
)
def test_init_random_writes_the_audio_tower_for_e2b_e4b_only(tmp_path, preset, text_only, has_audio):
    out = tmp_path / "ck"
    assert (
        main(
            ["init-random", "--preset", preset, "-o", str(out), "--dtype", "fp32"]
            + ["--text-only"] * text_only
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert (config.get("audio_config") is not None) == has_audio
    assert any(k.startswith(AUDIO_KEYS) for k in CheckpointReader(out).entries) == has_audio
    if has_audio:
        assert AudioSpec.from_pretrained(out) == AUDIO_PRESETS[preset]
        _, info = Gemma4ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
        assert not any(info.values()), {k: v for k, v in info.items() if v}


def test_audio_presets_are_e2b_and_e4b_only():
    assert set(AUDIO_PRESETS) == {"e2b", "e4b", "tiny-e2b", "tiny-e4b"}
    full = AUDIO_PRESETS["e4b"]
    assert (full.hidden_size, full.num_hidden_layers, full.head_dim, full.output_proj_dims) == (
        1024,
        12,
        128,
        1536,
    )
    assert AUDIO_PRESETS["e2b"].text_hidden_size == 1536 and full.text_hidden_size == 2560
    with torch.device("meta"):
        params = sum(p.numel() for p in Gemma4Audio(full).audio_tower.parameters())
    assert round(params / 1e6, 1) == 304.8  # the released tower (docs: 304.8 M)


@pytest.mark.parametrize("preset", list(AUDIO_PRESETS))
def test_spec_round_trips_through_config_json(preset):
    config = PRESETS[preset].to_hf_config()
    assert AudioSpec.from_hf_dict(config) is None
    config["audio_config"] = AUDIO_PRESETS[preset].to_hf_dict()
    assert AudioSpec.from_hf_dict(config) == AUDIO_PRESETS[preset]


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("num_attention_heads", 3, "do not divide hidden_size"),
        ("subsampling_conv_channels", [64, 32], r"expected \[128, C\]"),
        ("hidden_size", "1024", "expected int"),
        ("hidden_act", "gelu", "unsupported 'gelu'"),
        ("attention_logit_cap", "50", "expected a number"),
    ],
)
def test_bad_audio_config_is_a_one_line_error(field, value, match):
    config = PRESETS["tiny-e2b"].to_hf_config()
    config["audio_config"] = {**AUDIO_PRESETS["tiny-e2b"].to_hf_dict(), field: value}
    with pytest.raises(SpecError, match=match) as e:
        AudioSpec.from_hf_dict(config)
    assert "\n" not in str(e.value)


# ----- the contract the embed-stage merge must honour, against transformers end to end ----------------------
# Audio soft tokens enter the text decoder like image ones: placeholders -> pad before both embedding lookups,
# placeholder rows <- soft tokens in prompt order, unscaled. On E2B the decoder stays causal and unchanged.
AUDIO_TOKEN_ID = 258_881  # `audio_token_id` of every released Gemma 4 config
LOGIT_ATOL = 1e-4  # the text parity bound (tests/model/test_parity.py)


def _audio_prompt(n_tokens: list[int], length: int, starts: list[int]) -> torch.Tensor:
    ids = torch.randint(
        3, PRESETS["tiny-e2b"].vocab_size, (1, length), generator=torch.Generator().manual_seed(5)
    )
    for n, start in zip(n_tokens, starts, strict=True):
        ids[0, start : start + n] = AUDIO_TOKEN_ID
    return ids


@pytest.mark.parametrize("scale", [1.0, 64**0.5], ids=["unscaled", "negative control: scaled by sqrt(E)"])
def test_audio_prompt_logits_match_transformers(checkpoint, full_hf, towers, scale):
    hf, _ = full_hf
    ours = towers[0]
    text = load_model(checkpoint)
    features, mask = clips(*CASES["one block"], seed=2)  # 10 and 8 soft tokens
    with torch.no_grad():
        soft, valid = ours(features, mask)
        n = valid.sum(-1)
        ids = _audio_prompt(
            n.tolist(), 3 * text.spec.sliding_window + 25, [3, 19]
        )  # audio inside a 3-window prompt
        ref = hf(input_ids=ids, input_features=features, input_features_mask=mask).logits
        embeds, tok = text.embed(placeholders_to_pad(ids, text.spec.pad_token_id, AUDIO_TOKEN_ID))
        embeds = merge_image_soft_tokens(embeds, ids, soft * scale, n, AUDIO_TOKEN_ID)
        S = ids.shape[1]
        logits, _, _ = text(embeds, tok, torch.tensor([0]), torch.tensor([S]), text.new_cache(1, S))
    diff = (logits - ref).abs().max().item()
    if scale == 1.0:
        assert diff <= LOGIT_ATOL, f"max |Δlogit| {diff:.3g} exceeds {LOGIT_ATOL}"
    else:
        assert diff > 100 * LOGIT_ATOL
