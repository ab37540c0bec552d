"""Image prompts through the export (vision.onnx -> embed.onnx merge -> decoder.onnx, onnxruntime) against
transformers' Gemma4ForConditionalGeneration, staged (validate/images.py), on tiny E2B and tiny E4B.

The prompt (151 tokens, W = 8) holds two images (60 + 56 soft tokens) inside it. Measured on tiny-e2b:
preprocessing 0.0; soft tokens 1.7e-5 from transformers fp32 (its own fp32 run is 1.7e-5 from its fp64
run; ours 1.6e-5 from fp64); prompt logits 2.4e-4 (transformers fp32 vs fp64: 2.5e-4; with transformers'
soft tokens fed to our embed graph: 3e-5); greedy 16/16. The negative controls must fail at their stage.
"""

from __future__ import annotations

import copy

import pytest
import torch
from media_support import PlaceholderPLE

from gemma4_compile.runners.ort import OrtRunner
from gemma4_compile.validate.images import NOISE_FACTOR, validate_images

pytestmark = pytest.mark.slow  # one export and two transformers models per preset (~2 min each)


@pytest.fixture(scope="module")
def pipeline(media_references):
    """preset -> (OrtRunner, transformers fp32, transformers fp64)."""

    def get(preset: str):
        _, out, hf, hf64 = media_references(preset)
        return OrtRunner(out, threads=1), hf, hf64

    return get


@pytest.fixture(scope="module")
def e2b_report(pipeline):
    return validate_images(*pipeline("tiny-e2b"))


def _stage(report, name):
    return next(s for s in report.stages if s.name == name)


def test_e2b_image_prompt_passes_every_stage(e2b_report):
    report = e2b_report
    assert report.passed, report.failure()
    assert [s.name for s in report.stages] == ["preprocessing", "encoder", "end-to-end", "greedy"]
    assert report.prompt_tokens > 3 * 8 and report.image_tokens == [60, 56]
    assert _stage(report, "preprocessing").value <= 1e-6
    assert _stage(report, "greedy").value == 0  # 16/16 identical
    for name in ("encoder", "end-to-end"):  # within the issue's bound, or transformers' own fp32 noise
        s = _stage(report, name)
        assert s.value <= s.bound or s.exact <= NOISE_FACTOR * s.noise, s


def test_e4b_image_prompt_passes_every_stage(pipeline):
    report = validate_images(*pipeline("tiny-e4b"))
    assert report.passed, report.failure()
    assert _stage(report, "greedy").value == 0


def test_a_vision_weight_x1_05_fails_at_the_encoder_stage(pipeline):
    runner, hf, hf64 = pipeline("tiny-e2b")
    bad, bad64 = copy.deepcopy(hf), copy.deepcopy(hf64)
    with torch.no_grad():
        for m in (bad, bad64):
            m.model.embed_vision.embedding_projection.weight.mul_(1.05)
    report = validate_images(runner, bad, bad64, steps=1)
    assert not report.passed and "at the encoder stage" in report.failure()
    assert _stage(report, "encoder").exact > 100 * NOISE_FACTOR * _stage(report, "encoder").noise


def test_ple_of_placeholder_ids_fails_at_the_end_to_end_stage(pipeline, make_vision_export):
    _, hf, hf64 = pipeline("tiny-e2b")
    runner = PlaceholderPLE(make_vision_export("tiny-e2b")[1], threads=1)
    report = validate_images(runner, hf, hf64, steps=1)
    assert [s.passed for s in report.stages[:2]] == [True, True]  # preprocessing and encoder are fine
    assert not report.passed and "at the end-to-end stage" in report.failure()
