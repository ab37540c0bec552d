"""vision.onnx: onnxruntime against our torch tower (itself checked against transformers in test_vision.py).

One export keeps this cheap: the smallest text model (tiny-31b) with a vision tower that has every feature
at once (clipped linears, standardised soft tokens, head dim 12), checked by transformers to load.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from gemma4_compile.errors import CheckpointError, RunnerError
from gemma4_compile.export import ExportManifest, export_checkpoint
from gemma4_compile.model.checkpoint import write_random_checkpoint
from gemma4_compile.model.presets import PRESETS, VISION_PRESETS
from gemma4_compile.model.vision import patch_positions
from gemma4_compile.model.vision_weights import load_vision_model

# fp32 round-off of this tiny random tower is itself ~1e-5: our torch fp32 vs the same math in fp64 differs
# that much (1.3e-5; peaky scale-1.0 attention over norm weights up to 1.5). Observed ORT vs torch: 1.1e-5 (values ~4).
ORT_ATOL = 5e-5
TEXT = PRESETS["tiny-31b"]
VISION = dataclasses.replace(VISION_PRESETS["tiny-31b"], use_clipped_linears=True)
CASES = {  # (rows, cols) patch grids per call: dynamic image count and patch count
    "three images, padded": [(6, 9), (3, 6), (9, 3)],
    "one image, unpadded": [(12, 6)],
    "one soft token": [(3, 3)],
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision-export")
    write_random_checkpoint(TEXT, root / "ckpt", dtype=torch.float32, vision=VISION)
    export_checkpoint(root / "ckpt", root / "out", dtype="fp32", max_seq_len=64)
    return root / "ckpt", root / "out"


def _images(grids, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    P = max(r * c for r, c in grids)
    positions = torch.stack([patch_positions(r, c, P) for r, c in grids])
    pixels = torch.rand(len(grids), P, VISION.patch_dim, generator=g) * (positions[..., :1] >= 0)
    return pixels.numpy(), positions.numpy()


@pytest.mark.parametrize("case", CASES)
def test_ort_soft_tokens_match_our_tower(exported, case):
    ckpt, out = exported
    session = ort.InferenceSession(str(out / "vision.onnx"), providers=["CPUExecutionProvider"])
    pixels, positions = _images(CASES[case])
    soft, soft_len = session.run(None, {"pixel_values": pixels, "image_position_ids": positions})
    with torch.no_grad():
        ref, valid = load_vision_model(ckpt)(torch.from_numpy(pixels), torch.from_numpy(positions))
    np.testing.assert_array_equal(soft_len, [r * c // 9 for r, c in CASES[case]])
    np.testing.assert_array_equal(soft_len, valid.sum(-1).numpy())
    assert soft.shape == (len(pixels), pixels.shape[1] // 9, TEXT.hidden_size)
    diff = np.abs(soft - ref.numpy()).max()
    assert diff <= ORT_ATOL, f"max |Δ| {diff:.3g} exceeds {ORT_ATOL}"


def test_a_vision_weight_x1_05_fails_the_ort_check(exported):
    """The tolerance above is far below what a wrong weight costs."""
    ckpt, out = exported
    session = ort.InferenceSession(str(out / "vision.onnx"), providers=["CPUExecutionProvider"])
    pixels, positions = _images(CASES["three images, padded"])
    soft, _ = session.run(None, {"pixel_values": pixels, "image_position_ids": positions})
    model = load_vision_model(ckpt)
    with torch.no_grad():
        model.embed_vision.embedding_projection.weight.mul_(1.05)
        ref, _ = model(torch.from_numpy(pixels), torch.from_numpy(positions))
    assert np.abs(soft - ref.numpy()).max() > 100 * ORT_ATOL


def test_manifest_lists_the_vision_graph_with_its_io_and_dims(exported):
    _, out = exported
    m = ExportManifest.load(out)
    assert list(m.graphs) == ["vision", "embed", "decoder"]
    g = m.graphs["vision"]
    assert [(t.name, t.dtype, t.shape) for t in g.inputs] == [
        ("pixel_values", "float32", ("images", "patches", 768)),
        ("image_position_ids", "int64", ("images", "patches", 2)),
    ]
    assert [(t.name, t.dtype, t.shape) for t in g.outputs] == [
        ("image_soft_tokens", "float32", ("images", "soft_tokens", TEXT.hidden_size)),
        ("image_soft_len", "int64", ("images",)),
    ]
    assert {"images", "patches", "soft_tokens"} <= set(m.dims)
    m.check_graph_file("vision")
    proto = onnx.load(str(out / "vision.onnx"), load_external_data=False)
    external = {
        e.value for init in proto.graph.initializer for e in init.external_data if e.key == "location"
    }
    assert external == {"weights.data"}  # streamed with the text weights into the one data file
    assert not any(n.op_type in ("NonZero", "SplitToSequence", "SequenceAt") for n in proto.graph.node)


def test_config_with_a_vision_tower_but_no_vision_weights_is_refused(tmp_path):
    write_random_checkpoint(TEXT, tmp_path / "ckpt", dtype=torch.float32)
    config = json.loads((tmp_path / "ckpt/config.json").read_text())
    config["vision_config"] = VISION.to_hf_dict()
    (tmp_path / "ckpt/config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing tensor 'model.vision_tower.") as e:
        export_checkpoint(tmp_path / "ckpt", tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


@pytest.mark.rtx
def test_tensorrt_rtx_parses_and_builds_the_vision_graph(exported):
    """Standard ops only, no sequence ops or data-dependent shapes: the parser takes it as exported, and a
    profile over image count and patch count builds (on the CPU; nothing runs)."""
    import tensorrt_rtx as trt

    _, out = exported
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(out / "vision.onnx")), parser.get_error(0).desc()
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, width in (("pixel_values", VISION.patch_dim), ("image_position_ids", 2)):
        profile.set_shape(name, (1, 9, width), (2, 54, width), (4, 270, width))
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is not None


# ----- end to end: images -> preprocessing -> vision.onnx -> merge -> embed.onnx + decoder.onnx ------------
# This checkpoint's text config is causal (use_bidirectional_attention null), so transformers decodes the image
# runs causally, which our decoder computes when fed mm_block_ids -1 (the bidirectional blocks are checked
# in tests/validate/test_image_blocks.py). Error split, measured: the ONNX decoder fed
# transformers' own soft tokens is off by 1.2e-5 in the logits (the text bound 1e-4 holds); the ONNX soft
# tokens' fp32 round-off (1.8e-5 vs transformers, see ORT_ATOL) is amplified ~13x by the tiny random decoder,
# to 2.3e-4 (logits ~5), with every greedy token equal.
LOGIT_ATOL_HF_SOFT_TOKENS = 1e-4
LOGIT_ATOL_END_TO_END = 1e-3


@pytest.fixture(scope="module")
def e2e(exported):
    from PIL import Image
    from transformers import Gemma4ForConditionalGeneration

    from gemma4_compile.model.vision_merge import IMAGE_TOKEN_ID
    from gemma4_compile.model.vision_preprocess import batch_patches, image_patches

    ckpt, out = exported
    rng = np.random.default_rng(0)
    shapes = ((96, 144, 3), (40, 120, 3))  # 60 and 56 soft tokens at budget 70; the second is padded
    patches = [
        image_patches(Image.fromarray(rng.integers(0, 256, s, dtype=np.uint8)), VISION, 70) for s in shapes
    ]
    pixels, positions = batch_patches(patches)
    n = [p.soft_tokens for p in patches]
    ids = rng.integers(3, TEXT.vocab_size, (1, sum(n) + 3 * TEXT.sliding_window + 5))
    ids[0, 5 : 5 + n[0]] = IMAGE_TOKEN_ID
    ids[0, 9 + n[0] : 9 + n[0] + n[1]] = IMAGE_TOKEN_ID
    hf = Gemma4ForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager"
    )
    t = torch.from_numpy
    with torch.no_grad():
        ref = hf(input_ids=t(ids), pixel_values=t(pixels), image_position_ids=t(positions)).logits.numpy()
        hf_soft = hf.model.get_image_features(t(pixels), t(positions)).pooler_output
    return out, ids, pixels, positions, ref, hf_soft


def _onnx_logits(out, ids, soft, soft_len) -> np.ndarray:
    from gemma4_compile.runtime.images import soft_token_rows

    m = ExportManifest.load(out)
    session = {role: ort.InferenceSession(str(m.graph_path(role))) for role in ("embed", "decoder")}
    # the embed graph merges: placeholders -> pad, placeholder rows <- the images' real soft tokens
    feeds = {"input_ids": ids, "image_embeds": soft_token_rows(soft, soft_len)}
    (merged,) = session["embed"].run(None, feeds)  # no PLE on this text model
    S = ids.shape[1]
    # -1: this checkpoint's transformers config is causal (see above), so the image runs attend causally here
    feeds = {"inputs_embeds": merged, "past_len": np.array([0]), "seq_len": np.array([S])}
    feeds["mm_block_ids"] = np.full_like(ids, -1)
    feeds |= {name: np.zeros(c.shape(1, S), np.float32) for c in m.caches for name in c.past}
    return session["decoder"].run(["logits"], feeds)[0]


def test_onnx_text_graphs_fed_transformers_soft_tokens_match_its_logits(e2e):
    out, ids, _, _, ref, hf_soft = e2e
    soft = np.zeros((len(hf_soft), max(len(s) for s in hf_soft), TEXT.hidden_size), np.float32)
    for i, s in enumerate(hf_soft):
        soft[i, : len(s)] = s.numpy()
    soft_len = np.array([len(s) for s in hf_soft])
    diff = np.abs(_onnx_logits(out, ids, soft, soft_len) - ref).max()
    assert diff <= LOGIT_ATOL_HF_SOFT_TOKENS, f"max |Δlogit| {diff:.3g}"


def test_image_prompt_end_to_end_in_onnx_matches_transformers(e2e):
    out, ids, pixels, positions, ref, _ = e2e
    vision = ort.InferenceSession(str(out / "vision.onnx"))
    soft, soft_len = vision.run(None, {"pixel_values": pixels, "image_position_ids": positions})
    logits = _onnx_logits(out, ids, soft, soft_len)
    diff = np.abs(logits - ref).max()
    assert diff <= LOGIT_ATOL_END_TO_END, f"max |Δlogit| {diff:.3g}"
    np.testing.assert_array_equal(logits.argmax(-1), ref.argmax(-1))


# ----- 26B/31B: image runs attend both ways on sliding layers (mm_block_ids; tests/validate/test_image_blocks.py)


def test_a_31b_export_takes_mm_block_ids_and_no_audio(exported):
    from gemma4_compile.runners.ort import OrtRunner
    from gemma4_compile.runtime.audio import audio_support
    from gemma4_compile.runtime.errors import RuntimeInputError
    from gemma4_compile.runtime.images import image_support

    _, out = exported
    m = ExportManifest.load(out)
    assert m.multimodal.bidirectional_image_blocks and image_support(m) is m.multimodal
    assert [t.name for t in m.graphs["decoder"].inputs][:4] == [
        "inputs_embeds",
        "past_len",
        "seq_len",
        "mm_block_ids",
    ]
    proto = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    attention = [n for n in proto.graph.node if n.op_type == "SlidingWindowAttention"]
    assert attention and all(n.input[-1] == "mm_block_ids" for n in attention)  # global layers ignore it
    runner = OrtRunner(out)
    assert runner.image_refusal is None and runner.takes_block_ids
    with pytest.raises(RuntimeInputError, match="has no audio graph"):  # no audio tower on 26B/31B
        audio_support(m)
    with pytest.raises(RunnerError, match="takes no audio"):
        runner.attach_audio(runner.start(1, 8), np.zeros((1, TEXT.hidden_size), np.float32))
    text = np.array([[2, 9, 10]])  # text prompts run (zero image rows, block ids -1)
    assert runner.logits(text).shape == (1, 3, TEXT.vocab_size)


def test_gqa_lowering_of_a_31b_export_with_images_is_refused_in_one_line(exported, tmp_path):
    from gemma4_compile.errors import ExportError

    ckpt, _ = exported
    with pytest.raises(ExportError, match="cannot express the image-block mask") as e:
        export_checkpoint(ckpt, tmp_path / "gqa", lowering="gqa")
    assert "\n" not in str(e.value) and not (tmp_path / "gqa").exists()


def test_embed_graph_takes_image_embeds_with_a_dynamic_row_count(exported):
    _, out = exported
    m = ExportManifest.load(out)
    assert [(t.name, t.shape) for t in m.graphs["embed"].inputs] == [
        ("input_ids", ("batch", "sequence")),
        ("image_embeds", ("image_tokens", TEXT.hidden_size)),
    ]
    assert m.multimodal.tokens.image == 258_880 and "image_tokens" in m.dims
