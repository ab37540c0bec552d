"""bench on an export with vision.onnx and audio.onnx: encoder and multimodal TTFT rows next to prefill and
decode, from the runner's own export when no media inputs are given."""

from __future__ import annotations

import numpy as np

from gemma4_compile.validate import BenchConfig
from gemma4_compile.validate.bench import bench_runners


def test_bench_times_the_encoders_by_the_soft_tokens_they_make(make_vision_export):
    from PIL import Image

    from gemma4_compile.export.manifest import ExportManifest
    from gemma4_compile.model.audio_preprocess import audio_features
    from gemma4_compile.model.vision_preprocess import image_patches
    from gemma4_compile.runners.ort import OrtRunner

    _, out = make_vision_export("tiny-e2b")
    manifest = ExportManifest.load(out)
    config = BenchConfig(
        context_lengths=(4,), batch_sizes=(1,), decode_steps=1, prefill_repeats=2, image_budgets=(70, 140),
        audio_seconds=(0.5, 2.0),
    )  # fmt: skip
    report = bench_runners({"ort": lambda: OrtRunner(out, threads=1)}, manifest.spec, config)
    rows = {(r.phase, r.context): r for r in report.rows}
    image = Image.fromarray(np.zeros((768, 1024, 3), np.uint8))
    for budget in (70, 140):
        soft = image_patches(image, manifest.multimodal.vision, budget).soft_tokens
        row = rows[("vision", soft)]
        assert row.samples == 2 and row.p50_ms > 0 and row.vs_torch is None
    for seconds in (0.5, 2.0):
        soft = audio_features(np.zeros(int(seconds * 16000), np.float32) + 0.1, 16000).soft_tokens
        assert rows[("audio", soft)].samples == 2
    assert {r.phase for r in report.rows} == {"prefill", "decode", "vision", "audio", "ttft"}
