"""Our vision tower against transformers' (`Gemma4Model.get_image_features`, eager) on the same random checkpoint.

Two towers cover every feature: tiny-e2b (clipped linears, head dim 16) and tiny-31b (standardised soft
tokens, head dim 12). Norm weights and std_scale sit away from 1 and clip bounds are tight enough to clamp
(model/checkpoint.py); the negative controls show that each of those, and a weight x1.05, fails the check.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Gemma4ForConditionalGeneration

from gemma4_compile.errors import Gemma4CompileError, SpecError
from gemma4_compile.model.checkpoint import write_random_checkpoint
from gemma4_compile.model.presets import PRESETS, VISION_PRESETS
from gemma4_compile.model.vision import CLIP_BOUNDS, patch_positions
from gemma4_compile.model.vision_config import VisionSpec
from gemma4_compile.model.vision_merge import IMAGE_TOKEN_ID, merge_image_soft_tokens, placeholders_to_pad
from gemma4_compile.model.vision_weights import load_vision_model
from gemma4_compile.model.weights import CheckpointReader, load_model

FP32_ATOL = 1e-5  # the bound on soft tokens (values O(1)); observed ~2e-6
TOWERS = ("tiny-e2b", "tiny-31b")
# (rows, cols) of patch grids: sides are multiples of the 3x3 pooling kernel, as the processor makes them
IMAGES = ((6, 9), (3, 6), (9, 3))


@pytest.fixture(scope="module")
def vision_checkpoint(tmp_path_factory):
    cache = {}

    def make(preset: str):
        if preset not in cache:
            path = tmp_path_factory.mktemp("vision") / preset
            write_random_checkpoint(PRESETS[preset], path, dtype=torch.float32, vision=VISION_PRESETS[preset])
            cache[preset] = path
        return cache[preset]

    return make


@pytest.fixture(scope="module")
def towers(vision_checkpoint):
    """preset -> (ours, transformers' Gemma4Model), loaded once."""
    cache = {}

    def get(preset: str):
        if preset not in cache:
            path = vision_checkpoint(preset)
            hf = Gemma4ForConditionalGeneration.from_pretrained(
                path, dtype=torch.float32, attn_implementation="eager"
            )
            cache[preset] = load_vision_model(path), hf.model.eval()
        return cache[preset]

    return get


def images(spec: VisionSpec, grids, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pixels in [0, 1] for each (rows, cols) grid, padded to the largest: [N, P, 3p^2], [N, P, 2]."""
    g = torch.Generator().manual_seed(seed)
    P = max(r * c for r, c in grids)
    pixels = torch.rand(len(grids), P, spec.patch_dim, generator=g)
    positions = torch.stack([patch_positions(r, c, P) for r, c in grids])
    return pixels * (positions[..., :1] >= 0), positions  # padding patches are zeros, as the processor pads


def reference(hf, pixels, positions) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(hf.get_image_features(pixels, positions).pooler_output)


def assert_soft_tokens_match(
    ours, ref: list[torch.Tensor], pixels, positions, atol: float = FP32_ATOL
) -> None:
    """Valid rows equal transformers' per-image soft tokens; the padded rows are flagged invalid and zero."""
    with torch.no_grad():
        soft, valid = ours(pixels, positions)
    for i, r in enumerate(ref):
        n = r.shape[0]
        assert valid[i, :n].all() and not valid[i, n:].any(), f"image {i}: validity {valid[i].tolist()}"
        assert not soft[i, n:].any()
        diff = (soft[i, :n] - r).abs().max().item()
        assert diff <= atol, f"image {i}: max |Δ| {diff:.3g} exceeds {atol}"


@pytest.mark.parametrize("preset", TOWERS)
def test_transformers_loads_the_vision_checkpoint_with_no_missing_or_unexpected_keys(
    vision_checkpoint, preset
):
    _, info = Gemma4ForConditionalGeneration.from_pretrained(
        vision_checkpoint(preset), dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), {k: v for k, v in info.items() if v}


@pytest.mark.parametrize("preset", TOWERS)
def test_padded_batch_of_three_images_matches_transformers(towers, preset):
    ours, hf = towers(preset)
    pixels, positions = images(ours.spec, IMAGES)
    assert_soft_tokens_match(ours, reference(hf, pixels, positions), pixels, positions)


@pytest.mark.parametrize("preset", TOWERS)
def test_single_unpadded_image_matches_transformers(towers, preset):
    ours, hf = towers(preset)
    pixels, positions = images(ours.spec, [(12, 6)], seed=1)
    assert_soft_tokens_match(ours, reference(hf, pixels, positions), pixels, positions)


def _perturbed(vision_checkpoint, preset: str, edit) -> torch.nn.Module:
    model = load_vision_model(vision_checkpoint(preset))
    with torch.no_grad():
        edit(model)
    return model


NEGATIVE_CONTROLS = {
    "a vision weight x1.05": (
        "tiny-e2b",
        lambda m: m.vision_tower.encoder.layers[1].mlp.up_proj.linear.weight.mul_(1.05),
    ),
    "clip bounds dropped": (
        "tiny-e2b",
        lambda m: [
            getattr(mod, b).fill_(float("inf") if b.endswith("max") else -float("inf"))
            for mod in m.modules()
            if getattr(mod, "clip", False)
            for b in CLIP_BOUNDS
        ],
    ),
    "norm weight read as 1 + w": (
        "tiny-31b",
        lambda m: m.vision_tower.encoder.layers[0].input_layernorm.weight.add_(1),
    ),
    "std_scale dropped": ("tiny-31b", lambda m: m.vision_tower.std_scale.fill_(1.0)),
    "position table ignored": (
        "tiny-31b",
        lambda m: m.vision_tower.patch_embedder.position_embedding_table.zero_(),
    ),
}


@pytest.mark.parametrize("control", NEGATIVE_CONTROLS)
def test_negative_controls_fail_the_parity_check(towers, vision_checkpoint, control):
    preset, edit = NEGATIVE_CONTROLS[control]
    _, hf = towers(preset)
    bad = _perturbed(vision_checkpoint, preset, edit)
    pixels, positions = images(bad.spec, IMAGES)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_soft_tokens_match(bad, reference(hf, pixels, positions), pixels, positions)


def test_vision_weights_are_deterministic_and_scales_away_from_one(tmp_path, vision_checkpoint):
    spec, vision = PRESETS["tiny-31b"], VISION_PRESETS["tiny-31b"]
    write_random_checkpoint(spec, tmp_path / "again", dtype=torch.float32, vision=vision)
    write_random_checkpoint(spec, tmp_path / "other", dtype=torch.float32, vision=vision, seed=1)
    a, b, c = (
        CheckpointReader(p) for p in (vision_checkpoint("tiny-31b"), tmp_path / "again", tmp_path / "other")
    )
    keys = [k for k in a.entries if k.startswith("model.vision_tower.")]
    assert all(torch.equal(a.load(a.entries[k]), b.load(b.entries[k])) for k in keys)
    table = "model.vision_tower.patch_embedder.position_embedding_table"
    assert not torch.equal(a.load(a.entries[table]), c.load(c.entries[table]))
    for k in keys:
        if k.endswith(("norm.weight", "std_scale")):
            assert (a.load(a.entries[k]) - 1).abs().min() >= 0.1, k


def test_clip_bounds_straddle_zero_and_clamp_some_activations(vision_checkpoint):
    model = load_vision_model(vision_checkpoint("tiny-e2b"))
    q = model.vision_tower.encoder.layers[0].self_attn.q_proj
    assert -3 <= q.input_min < -1.5 and 1.5 < q.input_max <= 3
    assert -3 <= q.output_min < -1.5 and 1.5 < q.output_max <= 3


def test_text_tensors_are_unchanged_by_the_vision_tower(tmp_path, vision_checkpoint):
    """The vision tower adds tensors and a vision_config; every text tensor keeps its name and bytes."""
    write_random_checkpoint(PRESETS["tiny-e2b"], tmp_path / "text", dtype=torch.float32)
    text, both = CheckpointReader(tmp_path / "text"), CheckpointReader(vision_checkpoint("tiny-e2b"))
    assert set(both.entries) - set(text.entries) == {
        k for k in both.entries if k.startswith(("model.vision_tower.", "model.embed_vision."))
    }
    assert all(torch.equal(text.load(e), both.load(both.entries[k])) for k, e in text.entries.items())
    assert json.loads((tmp_path / "text/config.json").read_text())["vision_config"] is None


@pytest.mark.parametrize("preset", list(VISION_PRESETS))
def test_spec_round_trips_through_config_json(preset):
    config = PRESETS[preset].to_hf_config()
    assert VisionSpec.from_hf_dict(config) is None
    config["vision_config"] = VISION_PRESETS[preset].to_hf_dict()
    assert VisionSpec.from_hf_dict(config) == VISION_PRESETS[preset]


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("head_dim", 18, "multiple of 4"),
        ("num_key_value_heads", 1, "no grouped KV heads"),
        ("hidden_size", "768", "expected int"),
        ("rope_parameters", {"rope_type": "yarn"}, "unsupported 'yarn'"),
    ],
)
def test_bad_vision_config_is_a_one_line_error(field, value, match):
    config = PRESETS["tiny-e2b"].to_hf_config()
    config["vision_config"] = {**VISION_PRESETS["tiny-e2b"].to_hf_dict(), field: value}
    with pytest.raises(SpecError, match=match) as e:
        VisionSpec.from_hf_dict(config)
    assert "\n" not in str(e.value)


# ----- merge: image soft tokens into the text decoder's inputs, end to end against transformers ------------
# E2B/E4B decode images causally like text, so our unchanged decoder must reproduce transformers' logits.
# (26B/31B let each image run attend both ways on sliding layers: not in our decoder yet.)
LOGIT_ATOL = 1e-4  # the text parity bound (tests/model/test_parity.py)


def image_prompt(spec, vision: VisionSpec, grids, length: int, starts, seed: int = 0) -> torch.Tensor:
    """[1, length] random text ids with each image's placeholder run (rows*cols/9 ids) at its start."""
    ids = torch.randint(3, spec.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    for (r, c), start in zip(grids, starts, strict=True):
        ids[0, start : start + r * c // vision.patches_per_token] = IMAGE_TOKEN_ID
    return ids


def our_logits(text_model, vision_model, ids, pixels, positions, scale_soft: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        soft, valid = vision_model(pixels, positions)
        embeds, tok = text_model.embed(placeholders_to_pad(ids, text_model.spec.pad_token_id))
        embeds = merge_image_soft_tokens(embeds, ids, soft * scale_soft, valid.sum(-1))
        S = ids.shape[1]
        caches = text_model.new_cache(1, S)
        logits, _, _ = text_model(embeds, tok, torch.tensor([0]), torch.tensor([S]), caches)
    return logits


@pytest.fixture(scope="module")
def e2b_pipeline(vision_checkpoint):
    path = vision_checkpoint("tiny-e2b")
    hf = Gemma4ForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    return load_model(path), load_vision_model(path), hf.eval()


def _e2b_case():
    spec, vision = PRESETS["tiny-e2b"], VISION_PRESETS["tiny-e2b"]
    grids = [(6, 9), (3, 6)]  # 6 + 2 soft tokens, prompt over three windows with the images inside
    ids = image_prompt(spec, vision, grids, 3 * spec.sliding_window + 5, starts=(4, 21))
    return (ids, *images(vision, grids, seed=3))


def test_merged_prompt_logits_match_transformers(e2b_pipeline):
    text_model, vision_model, hf = e2b_pipeline
    ids, pixels, positions = _e2b_case()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, image_position_ids=positions).logits
    diff = (our_logits(text_model, vision_model, ids, pixels, positions) - ref).abs().max().item()
    assert diff <= LOGIT_ATOL, f"max |Δlogit| {diff:.3g} exceeds {LOGIT_ATOL}"


def test_soft_tokens_scaled_like_text_embeddings_fail_the_check(e2b_pipeline):
    """Negative control: soft tokens multiplied by sqrt(E) as text embeddings are."""
    text_model, vision_model, hf = e2b_pipeline
    ids, pixels, positions = _e2b_case()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, image_position_ids=positions).logits
    bad = our_logits(
        text_model, vision_model, ids, pixels, positions, scale_soft=text_model.spec.hidden_size**0.5
    )
    assert (bad - ref).abs().max().item() > 100 * LOGIT_ATOL


def test_merge_fills_placeholders_in_prompt_order_across_the_batch():
    embeds = torch.zeros(2, 5, 1)
    ids = torch.tensor([[7, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 7, IMAGE_TOKEN_ID], [IMAGE_TOKEN_ID, 7, 7, 7, 7]])
    soft = torch.tensor(
        [[[1.0], [2.0], [0.0]], [[3.0], [4.0], [0.0]]]
    )  # image 0: 2 tokens, image 1: 2 tokens
    merged = merge_image_soft_tokens(embeds, ids, soft, torch.tensor([2, 2]))
    assert merged[..., 0].tolist() == [[0, 1, 2, 0, 3], [4, 0, 0, 0, 0]]


def test_merge_with_a_wrong_placeholder_count_is_a_one_line_error():
    ids = torch.tensor([[IMAGE_TOKEN_ID, 7]])
    with pytest.raises(Gemma4CompileError, match="1 image placeholders but the images give 2 soft tokens"):
        merge_image_soft_tokens(torch.zeros(1, 2, 1), ids, torch.zeros(1, 2, 1), torch.tensor([2]))
