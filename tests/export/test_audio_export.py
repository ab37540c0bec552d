"""audio.onnx: onnxruntime against our torch tower (itself checked against transformers in test_audio.py).

One export, kept as small as it goes: the smallest text model (tiny-31b, no PLE) with tiny-e2b's audio tower
and no vision tower, fp32. Still ~1.5 min on two shared cores (the audio trace alone is ~50 s), hence `slow`.
The cases cover the dynamic clip and frame counts, one soft token, right padding across attention blocks, a
full 30 s clip (3000 frames, 750 soft tokens) and features from our numpy front end.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from gemma4_compile.errors import CheckpointError
from gemma4_compile.export import ExportManifest, export_checkpoint
from gemma4_compile.model.audio_preprocess import audio_features, batch_features, soft_token_count
from gemma4_compile.model.audio_weights import load_audio_model
from gemma4_compile.model.checkpoint import write_random_checkpoint
from gemma4_compile.model.presets import AUDIO_PRESETS, PRESETS

pytestmark = pytest.mark.slow

ORT_ATOL = 1e-5  # the bound; observed <= 4e-6 (soft tokens ~3)
TEXT, AUDIO = PRESETS["tiny-31b"], AUDIO_PRESETS["tiny-e2b"]  # the export needs no E2B text model
CASES = {  # (frames, valid frames per clip)
    "two clips, one soft token each": (4, (4, 1)),
    "two clips, short, padded": (7, (7, 3)),
    "two clips, five blocks, padded": (203, (203, 110)),
    "one clip of 30 s": (3000, (3000,)),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio-export")
    write_random_checkpoint(TEXT, root / "ckpt", dtype=torch.float32, audio=AUDIO)
    export_checkpoint(root / "ckpt", root / "out", dtype="fp32", max_seq_len=64)
    return root / "ckpt", root / "out"


@pytest.fixture(scope="module")
def session(exported):
    return ort.InferenceSession(str(exported[1] / "audio.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tower(exported):
    return load_audio_model(exported[0])


def _clips(frames: int, valid: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    mask = np.arange(frames)[None] < np.array(valid)[:, None]
    features = np.random.default_rng(frames).standard_normal((len(valid), frames, 128)).astype(np.float32)
    return features * mask[..., None], mask


def _compare(session, tower, features: np.ndarray, mask: np.ndarray) -> float:
    soft, soft_len = session.run(None, {"input_features": features, "input_features_mask": mask})
    with torch.no_grad():
        ref, valid = tower(torch.from_numpy(features), torch.from_numpy(mask))
    np.testing.assert_array_equal(soft_len, valid.sum(-1).numpy())
    assert soft.shape == ref.shape == (len(mask), soft_token_count(mask.shape[1]), TEXT.hidden_size)
    return float(np.abs(soft - ref.numpy()).max())


@pytest.mark.parametrize("case", CASES)
def test_ort_soft_tokens_match_our_tower(session, tower, case):
    frames, valid = CASES[case]
    diff = _compare(session, tower, *_clips(frames, valid))
    assert diff <= ORT_ATOL, f"max |Δ| {diff:.3g} exceeds {ORT_ATOL}"


def test_ort_on_front_end_features_matches_our_tower_and_the_token_counts(session, tower):
    rng = np.random.default_rng(1)
    clips = [audio_features(rng.standard_normal(n).astype(np.float32) * 0.1, 16_000) for n in (20_800, 6_400)]
    features, mask = batch_features(clips)
    soft_len = session.run(["audio_soft_len"], {"input_features": features, "input_features_mask": mask})[0]
    assert soft_len.tolist() == [c.soft_tokens for c in clips] == [33, 10]
    diff = _compare(session, tower, features, mask)
    assert diff <= ORT_ATOL, f"max |Δ| {diff:.3g} exceeds {ORT_ATOL}"


def test_an_audio_weight_x1_05_fails_the_ort_check(exported, session):
    """The tolerance above is far below what a wrong weight costs."""
    bad = load_audio_model(exported[0])
    with torch.no_grad():
        bad.audio_tower.layers[0].lconv1d.linear_start.linear.weight.mul_(1.05)
    assert _compare(session, bad, *_clips(*CASES["two clips, five blocks, padded"])) > 100 * ORT_ATOL


def test_manifest_lists_the_audio_graph_with_its_io_and_dims(exported):
    _, out = exported
    m = ExportManifest.load(out)
    assert list(m.graphs) == ["audio", "embed", "decoder"]
    g = m.graphs["audio"]
    assert [(t.name, t.dtype, t.shape) for t in g.inputs] == [
        ("input_features", "float32", ("clips", "frames", 128)),
        ("input_features_mask", "bool", ("clips", "frames")),
    ]
    assert [(t.name, t.dtype, t.shape) for t in g.outputs] == [
        ("audio_soft_tokens", "float32", ("clips", "audio_tokens", TEXT.hidden_size)),
        ("audio_soft_len", "int64", ("clips",)),
    ]
    assert {"clips", "frames", "audio_tokens"} <= set(m.dims)
    m.check_graph_file("audio")
    proto = onnx.load(str(out / "audio.onnx"), load_external_data=False)
    external = {
        e.value for init in proto.graph.initializer for e in init.external_data if e.key == "location"
    }
    assert external == {"weights.data"}  # streamed with the text weights into the one data file
    banned = {"NonZero", "Compress", "SplitToSequence", "SequenceAt", "Loop", "If"}
    assert not banned & {n.op_type for n in proto.graph.node}


def test_config_with_an_audio_tower_but_no_audio_weights_is_refused(tmp_path):
    write_random_checkpoint(TEXT, tmp_path / "ckpt", dtype=torch.float32)
    config = json.loads((tmp_path / "ckpt/config.json").read_text())
    config["audio_config"] = AUDIO.to_hf_dict()
    (tmp_path / "ckpt/config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing tensor 'model.audio_tower.") as e:
        export_checkpoint(tmp_path / "ckpt", tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


@pytest.mark.rtx
def test_tensorrt_rtx_parses_and_builds_the_audio_graph(exported):
    """Standard ops only (no sequence ops, no data-dependent shapes, no NonZero): the parser takes it as
    exported, and a profile from 4 frames to 30 s builds (on the CPU; nothing runs)."""
    import tensorrt_rtx as trt

    _, out = exported
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(out / "audio.onnx")), parser.get_error(0).desc()
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("input_features", (1, 4, 128), (2, 500, 128), (4, 3000, 128))
    profile.set_shape("input_features_mask", (1, 4), (2, 500), (4, 3000))
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is not None


def test_fp16_export_keeps_attention_in_fp32_and_tracks_fp32(tmp_path, exported, tower):
    """Half precision: every Softmax of the graph reads fp32 logits (the attention island), no inf/NaN on
    a full 30 s clip, and the soft tokens keep the reduced-precision bar (cosine >= 0.999 per valid token;
    observed 0.999998, max |Δ| 7e-3)."""
    export_checkpoint(exported[0], tmp_path / "fp16", dtype="fp16", max_seq_len=64)
    proto = onnx.shape_inference.infer_shapes(
        onnx.load(str(tmp_path / "fp16/audio.onnx"), load_external_data=False)
    )
    types = {v.name: v.type.tensor_type.elem_type for v in proto.graph.value_info}
    softmax_inputs = [types.get(n.input[0]) for n in proto.graph.node if n.op_type == "Softmax"]
    assert softmax_inputs and set(softmax_inputs) == {onnx.TensorProto.FLOAT}
    session = ort.InferenceSession(str(tmp_path / "fp16/audio.onnx"), providers=["CPUExecutionProvider"])
    features, mask = _clips(3000, (3000, 1700))
    soft = session.run(
        ["audio_soft_tokens"], {"input_features": features.astype(np.float16), "input_features_mask": mask}
    )
    soft = soft[0].astype(np.float32)
    with torch.no_grad():
        ref, valid = tower(torch.from_numpy(features), torch.from_numpy(mask))
    ref, valid = ref.numpy(), valid.numpy()
    assert np.isfinite(soft).all()
    cosine = (soft * ref).sum(-1) / (np.linalg.norm(soft, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-12)
    assert cosine[valid].min() >= 0.999, f"min cosine {cosine[valid].min():.6f}"


@pytest.mark.parametrize(
    "modalities,message",
    [
        ("text,vision", "the checkpoint has no vision tower"),
        ("text,audio", "needs vision too"),
        ("vision,audio", "text is always exported"),
        ("text,speech", "unknown modality 'speech'"),
    ],
)
def test_impossible_modalities_are_refused_in_one_line(exported, tmp_path, capsys, modalities, message):
    from gemma4_compile.cli import main

    out = tmp_path / "out"
    assert main(["export", str(exported[0]), "-o", str(out), "--modalities", modalities]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and not out.exists()


def test_modalities_text_leaves_the_towers_out(exported, tmp_path):
    m = export_checkpoint(exported[0], tmp_path / "out", max_seq_len=16, modalities=["text"]).manifest
    assert list(m.graphs) == ["embed", "decoder"] and m.multimodal is None


def test_bf16_graph_runs_its_convs_in_fp32(tmp_path):
    """ONNX Conv takes no bfloat16 before opset 22 (the graphs are opset 20): a bf16 audio graph passes the
    full checker (the export runs it) with every Conv computed in fp32 between casts."""
    from gemma4_compile.export import export_spec

    export_spec(TEXT, tmp_path / "bf16", dtype="bf16", audio=AUDIO)
    graph = onnx.load(str(tmp_path / "bf16" / "audio.onnx"), load_external_data=False)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in onnx.shape_inference.infer_shapes(graph).graph.value_info
    }
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 + AUDIO.num_hidden_layers
    assert {types[n.input[0]] for n in convs} == {onnx.TensorProto.FLOAT}
