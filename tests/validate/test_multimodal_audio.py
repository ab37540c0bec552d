"""Audio prompts through the export (audio.onnx -> embed.onnx merge -> decoder.onnx, onnxruntime) against
transformers' Gemma4ForConditionalGeneration, staged (validate/audio.py), on the shared tiny-e2b vision+audio
export, through validate's hook (validate.py `_validate_media`; the image check is stubbed there: its own
tests run it).

The prompt (59 tokens, W = 8) holds two clips (0.6 s, 0.37 s: 15 + 9 soft tokens). Measured on tiny-e2b:
preprocessing 0.0; soft tokens 1.8e-6 from transformers fp32 (values up to 2.9); prompt logits 2.1e-5
(1.5e-5 with transformers' soft tokens fed to our embed graph; transformers fp32 vs its fp64 decoder 1.5e-5);
greedy 16/16. The negative controls must fail at their stage.
"""

from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest
import torch
from media_support import PlaceholderPLE

from gemma4_compile.errors import RunnerError
from gemma4_compile.export.manifest import ExportManifest
from gemma4_compile.runners.ort import OrtRunner
from gemma4_compile.validate import images as image_check
from gemma4_compile.validate.audio import FEATURE_ATOL, validate_audio
from gemma4_compile.validate.images import ImageReport
from gemma4_compile.validate.report import accuracy_markdown

validate_module = importlib.import_module(
    "gemma4_compile.validate.validate"
)  # the package re-exports validate()
pytestmark = pytest.mark.slow  # shares the tiny-e2b vision+audio export; ~30 s on top of it


@pytest.fixture(scope="module")
def pipeline(media_references):
    """(checkpoint, export, OrtRunner, transformers fp32, transformers fp64)."""
    ckpt, out, hf, hf64 = media_references("tiny-e2b")
    return ckpt, out, OrtRunner(out, threads=1), hf, hf64


@pytest.fixture(scope="module")
def validated(pipeline):
    """The report `validate` writes for this export, its audio part computed for real."""
    ckpt, out, runner, hf, hf64 = pipeline
    tolerance = validate_module.TOLERANCES["fp32"]
    blank = validate_module.AccuracyReport("ort", "torch", "fp32", 8, 16, tolerance, [], [], None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(validate_module, "_references", lambda ckpt, precision: (hf, hf64))
        mp.setattr(image_check, "validate_images", lambda *a: ImageReport(0, [], []))
        return validate_module._validate_media(blank, ExportManifest.load(out), runner, ckpt)


def _stage(report, name):
    return next(s for s in report["stages"] if s["name"] == name)


def test_the_embed_graph_takes_audio_rows_and_export_json_records_the_audio_ids(pipeline):
    m = ExportManifest.load(pipeline[1])
    assert [(t.name, t.shape) for t in m.graphs["embed"].inputs] == [
        ("input_ids", ("batch", "sequence")),
        ("image_embeds", ("image_tokens", 64)),
        ("audio_embeds", ("audio_embed_tokens", 64)),
    ]
    assert m.multimodal.audio.to_dict() == {"boa": 7, "audio": 258_881, "eoa": 8}  # tiny vocab: <unused2/3>
    assert m.multimodal.to_dict()["audio"]["sample_rate"] == 16_000 and "audio_embed_tokens" in m.dims


def test_audio_prompt_passes_every_stage_through_validate(validated):
    audio = validated.audio
    assert audio["passed"] and validated.passed, validated.failure_message()
    assert [s["name"] for s in audio["stages"]] == ["preprocessing", "encoder", "end-to-end", "greedy"]
    assert audio["prompt_tokens"] > 3 * 8 and audio["audio_tokens"] == [15, 9]
    assert _stage(audio, "preprocessing")["value"] <= FEATURE_ATOL
    assert _stage(audio, "encoder")["value"] <= 1e-5  # the fixed bound: no fp64 audio tower exists
    e2e = _stage(audio, "end-to-end")
    assert e2e["value"] <= e2e["bound"] or e2e["exact"] <= 2 * e2e["noise"], e2e
    assert _stage(audio, "greedy")["value"] == 0  # 16/16 identical
    assert "audio prompt vs transformers: preprocessing 0" in validated.summary()
    markdown = accuracy_markdown(validated)
    assert "## Audio prompt vs transformers" in markdown and "2 audio clips ([15, 9] soft tokens)" in markdown


def test_an_audio_weight_x1_05_fails_at_the_encoder_stage(pipeline):
    _, _, runner, hf, hf64 = pipeline
    bad, bad64 = copy.deepcopy(hf), copy.deepcopy(hf64)
    with torch.no_grad():
        for m in (bad, bad64):
            m.model.audio_tower.layers[0].lconv1d.linear_start.linear.weight.mul_(1.05)
    report = validate_audio(runner, bad, bad64, steps=1)
    assert not report.passed and "audio prompt fails at the encoder stage" in report.failure()
    assert report.stages[1].value > 100 * report.stages[1].bound


class AudioPlaceholderPLE(PlaceholderPLE):
    placeholder = "audio_token_id"


def test_ple_of_audio_placeholder_ids_fails_at_the_end_to_end_stage(pipeline):
    _, out, _, hf, hf64 = pipeline
    report = validate_audio(AudioPlaceholderPLE(out, threads=1), hf, hf64, steps=1)
    assert [s.passed for s in report.stages[:2]] == [True, True]  # preprocessing and encoder are fine
    assert not report.passed and "at the end-to-end stage" in report.failure()


def test_text_calls_feed_zero_image_and_audio_rows_in_the_ort_and_trt_embed_stages(pipeline):
    """The TensorRT runner's CPU embed stage and the onnxruntime runner feed both soft-token inputs zero rows:
    a text prompt embeds as the lookup alone (checked against the embed graph fed explicit zero rows)."""
    from gemma4_compile.runners.trt import EmbedGraph

    out, runner = pipeline[1], pipeline[2]
    m = ExportManifest.load(out)
    soft = [t for t in m.graphs["embed"].inputs if t.name.endswith("_embeds")]
    ids = np.array([[2, 9, 10, 11]])
    trt_embed = EmbedGraph(m.graph_path("embed"), soft).run(ids)
    zero = {t.name: np.zeros((0, t.shape[1]), np.float32) for t in soft}
    import onnxruntime as ort

    embed = ort.InferenceSession(str(m.graph_path("embed")))  # the graph as written (the runner feeds rows)
    ref = embed.run(None, {"input_ids": ids, **zero})
    for name, expected in zip([t.name for t in m.graphs["embed"].outputs], ref):
        np.testing.assert_array_equal(trt_embed[name], expected)
    with pytest.raises(RunnerError, match="the prompt has 2 audio placeholders but 0 audio soft tokens"):
        runner.logits(np.array([[2, 9, m.multimodal.audio.audio, m.multimodal.audio.audio]]))
