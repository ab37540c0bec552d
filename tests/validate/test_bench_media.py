"""bench's media rows on the tiny image+audio export: encoder latency per budget and per clip, and the time to
first token of an image+audio+text prompt, for the backend (onnxruntime), our torch towers and transformers
eager, in one run. No timing assertions: rows exist with positive times, counts match the budgets."""

from __future__ import annotations

import numpy as np
import pytest

from gemma4_compile.validate import BenchConfig
from gemma4_compile.validate.bench import bench_runners, media_inputs

BUDGETS, SECONDS = (70, 140), (0.5, 2.0)
CONFIG = BenchConfig(
    context_lengths=(4,), batch_sizes=(1,), decode_steps=1, prefill_repeats=2, image_budgets=BUDGETS,
    audio_seconds=SECONDS, ttft_audio_seconds=0.5, ttft_text_tokens=8,
)  # fmt: skip


@pytest.fixture(scope="module")
def report(make_vision_export):
    """`bench` as the CLI runs it: onnxruntime, then torch and transformers, each with its media side."""
    from gemma4_compile.export.manifest import ExportManifest
    from gemma4_compile.validate import bench

    _, out = make_vision_export("tiny-e2b")
    return ExportManifest.load(out), bench(out, config=CONFIG, memory=False, write=False)


def _expected_counts(manifest) -> tuple[dict[int, int], dict[float, int]]:
    """Soft tokens per budget and per clip length, from the preprocessing alone (no encoder)."""
    from PIL import Image

    from gemma4_compile.model.audio_preprocess import audio_features
    from gemma4_compile.model.vision_preprocess import image_patches

    image = Image.fromarray(np.zeros((768, 1024, 3), np.uint8))
    images = {b: image_patches(image, manifest.multimodal.vision, b).soft_tokens for b in BUDGETS}
    clips = {s: audio_features(np.full(int(s * 16000), 0.1, np.float32), 16000).soft_tokens for s in SECONDS}
    return images, clips


@pytest.mark.parametrize("backend", ["ort", "torch", "hf"])
def test_encoder_rows_per_budget_and_clip(report, backend):
    manifest, r = report
    images, clips = _expected_counts(manifest)
    vision = {x.budget: x for x in r.rows if x.backend == backend and x.phase == "vision"}
    audio = {x.audio_s: x for x in r.rows if x.backend == backend and x.phase == "audio"}
    assert sorted(vision) == sorted(BUDGETS) and sorted(audio) == sorted(SECONDS)
    for budget, row in vision.items():
        assert row.context == images[budget] <= budget  # the soft tokens this side's encoder made
        assert row.samples == CONFIG.prefill_repeats and row.p50_ms > 0
    for seconds, row in audio.items():
        assert row.context == clips[seconds] and row.p50_ms > 0
        assert row.ms_per_audio_s == pytest.approx(row.p50_ms / seconds)


def test_rows_carry_ratios_against_transformers_and_torch(report):
    _, r = report
    for row in (x for x in r.rows if x.backend == "ort" and x.phase in ("vision", "audio")):
        hf = r.row("hf", row.phase, 1, row.context)
        torch = r.row("torch", row.phase, 1, row.context)
        assert row.vs_hf == pytest.approx(row.p50_ms / hf.p50_ms)
        assert row.vs_torch == pytest.approx(row.p50_ms / torch.p50_ms)


def test_multimodal_ttft_for_the_backend_and_transformers(report):
    """The TTFT prompt holds one image at the TTFT budget and one clip; both sides generate the same token."""
    manifest, r = report
    ttft = {x.backend: x for x in r.rows if x.phase == "ttft"}
    assert set(ttft) == {"ort", "hf"}  # our torch text model merges no soft tokens: no TTFT row
    ort, hf = ttft["ort"], ttft["hf"]
    assert ort.context == hf.context and ort.p50_ms > 0 and hf.p50_ms > 0
    assert ort.budget == CONFIG.ttft_budget and ort.audio_s == CONFIG.ttft_audio_seconds
    assert ort.first_token == hf.first_token
    assert ort.vs_hf == pytest.approx(ort.p50_ms / hf.p50_ms)
    media = media_inputs(manifest, CONFIG)
    ids = media.prompt.ids[0]
    mm = manifest.multimodal
    images, clips = _expected_counts(manifest)
    assert ort.context == len(ids)
    assert int((ids == mm.tokens.image).sum()) == images[CONFIG.ttft_budget]
    assert int((ids == mm.audio.audio).sum()) == clips[CONFIG.ttft_audio_seconds]


def test_media_rows_reach_the_reports(report, tmp_path):
    from gemma4_compile.validate.report import write_reports

    _, r = report
    write_reports(tmp_path, latency=r)
    md = (tmp_path / "reports" / "latency.md").read_text()
    assert "ttft" in md and "× hf" in md and "ms per audio s" in md
    rows = r.to_dict()["rows"]
    assert any(x["phase"] == "audio" and x["ms_per_audio_s"] > 0 for x in rows)
    assert "media prompt TTFT" in r.summary()


def test_the_backend_side_imports_no_torch(make_vision_export):
    """The backend's media rows (encoders and TTFT) in a fresh interpreter: torch and transformers stay out."""
    import subprocess
    import sys

    _, out = make_vision_export("tiny-e2b")
    code = f"""
import sys
from gemma4_compile.runners.ort import OrtRunner
from gemma4_compile.validate.bench import BenchConfig, bench_runners
runner = OrtRunner({str(out)!r}, threads=1)
config = BenchConfig((4,), (1,), 1, 1, image_budgets=(70,), audio_seconds=(0.5,), ttft_text_tokens=8)
rows = bench_runners({{"ort": runner}}, runner.spec, config).rows
print(sorted({{r.phase for r in rows}}), "torch" in sys.modules, "transformers" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (
        done.stdout.strip().splitlines()[-1] == "['audio', 'decode', 'prefill', 'ttft', 'vision'] False False"
    )


def test_a_reference_side_that_cannot_load_is_named_in_the_report(make_vision_export, tmp_path):
    from gemma4_compile.errors import BackendUnavailable
    from gemma4_compile.runners.ort import OrtRunner
    from gemma4_compile.validate.report import latency_markdown

    def unavailable():
        raise BackendUnavailable("hf: transformers is not installed")

    _, out = make_vision_export("tiny-e2b")
    runner = OrtRunner(out, threads=1)
    config = BenchConfig((4,), (1,), 1, 1, image_budgets=(70,), audio_seconds=(0.5,), ttft_text_tokens=8)
    r = bench_runners({"ort": runner}, runner.spec, config, media_sides={"hf": unavailable})
    assert [(s.backend, s.media_error) for s in r.backends] == [
        ("ort", None),
        ("hf", "hf: transformers is not installed"),
    ]
    assert {x.backend for x in r.rows} == {"ort"} and all(x.vs_hf is None for x in r.rows)
    assert "no media rows: hf: transformers is not installed" in latency_markdown(r)
