"""TrtRunner with image and audio prompts, on the fakes of its CUDA and TensorRT seams (trt_fakes.py) over the
tiny-e2b fp32 vision+audio export: vision.engine / audio.engine give onnxruntime's soft tokens, an
image+audio prompt decodes onnxruntime's greedy tokens, and a request beyond a tower engine's profile is one
line naming the limit. (TensorRT itself and real device memory: the GPU tests of test_trt_runner.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from trt_fakes import FakeCuda, runner_on_fakes

from gemma4_compile.engines.profiles import ProfileLimits
from gemma4_compile.errors import RunnerError
from gemma4_compile.export.manifest import AUDIO
from gemma4_compile.model.audio_preprocess import audio_features, batch_features
from gemma4_compile.model.vision_preprocess import batch_patches
from gemma4_compile.runtime.audio import AUDIO_MARKER
from gemma4_compile.runtime.images import IMAGE_MARKER, image_patches, media_prompt
from gemma4_compile.runtime.tokenizer import TextTokenizer

# the engines a build with these options makes: 1 image of up to 70 soft tokens, 1 clip of up to 1 s
LIMITS = ProfileLimits(
    max_batch=2, max_seq=128, max_images=1, max_image_tokens=70, max_clips=1, max_frames=100
)
BUDGET, STEPS = 70, 6


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def picture(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8))


@pytest.fixture(scope="module")
def runners(make_vision_export):
    from gemma4_compile.runners.ort import OrtRunner

    _, out = make_vision_export("tiny-e2b")
    # the fakes run decoder.onnx as exported: the onnxruntime runner without its fusions and CPU kernels computes
    # the same bits
    return out, runner_on_fakes(out, FakeCuda(), LIMITS), OrtRunner(out, threads=1, fuse=False, kernels=False)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def test_tower_engines_give_onnxruntimes_soft_tokens_bit_for_bit(runners):
    _, trt, ort = runners
    pixels, positions = batch_patches(image_patches([picture(40, 60)], ort.manifest.multimodal, BUDGET))
    features, mask = batch_features([audio_features(tone(0.7), 16_000)])
    for encode, inputs in (("encode_images", (pixels, positions)), ("encode_audio", (features, mask))):
        got, want = getattr(trt, encode)(*inputs), getattr(ort, encode)(*inputs)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape, encode
            np.testing.assert_array_equal(_bits(g), _bits(w), err_msg=encode)
    assert int(got[1][0]) == 18  # 0.7 s: one soft token per 40 ms, the clip's real rows


def _greedy(runner, prompt, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The prompt prefilled in one step with its soft tokens attached, then greedy one-token steps."""
    state = runner.start(1, len(prompt.ids) + steps)
    runner.attach_images(state, prompt.image_embeds)
    runner.attach_audio(state, prompt.audio_embeds)
    last = runner.step(state, np.array([prompt.ids]), np.array([len(prompt.ids)]))[0, -1]
    tokens, logits = [], []
    for i in range(steps):
        tokens.append(int(last.argmax()))
        logits.append(last)
        if i + 1 < steps:
            last = runner.step(state, np.array([[tokens[-1]]]), np.ones(1, np.int64))[0, 0]
    return np.array(tokens), np.stack(logits)


def test_an_image_and_audio_prompt_decodes_onnxruntimes_greedy_tokens(runners, tmp_path):
    """The runtime's prompt builder on the TRT runner (its manifest, its encoders), then the decoder engine
    with the soft tokens merged by the CPU embed graph: onnxruntime's tokens and logits, bit for bit, on a
    prompt far longer than the sliding window (8)."""
    out, trt, ort = runners
    picture(40, 60).save(tmp_path / "a.png")
    text = f"Look {IMAGE_MARKER} and listen {AUDIO_MARKER}, then say what you saw and heard."
    tokenizer = TextTokenizer(out)
    clip = _wav(tmp_path / "a.wav", tone(0.5))
    prompts = [
        media_prompt(r, tokenizer, text, [tmp_path / "a.png"], budget=BUDGET, audio_paths=[clip])
        for r in (trt, ort)
    ]
    assert prompts[0].ids == prompts[1].ids and len(prompts[0].ids) > 3 * 8
    for name in ("image_embeds", "audio_embeds"):
        np.testing.assert_array_equal(_bits(getattr(prompts[0], name)), _bits(getattr(prompts[1], name)))
    (got, got_logits), (want, want_logits) = (_greedy(r, p, STEPS) for r, p in zip((trt, ort), prompts))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(_bits(got_logits), _bits(want_logits))


def test_generate_with_an_image_on_the_trt_backend(runners, tmp_path, monkeypatch):
    """`generate --backend trt --image ...` (commands.generate_text, open_runner swapped for the fakes) writes
    the text the ort backend writes."""
    from gemma4_compile.runtime import commands

    out, trt, ort = runners
    picture(32, 48, seed=1).save(tmp_path / "b.png")
    texts = {}
    for backend, runner in (("trt", trt), ("ort", ort)):
        monkeypatch.setattr(commands, "open_runner", lambda *a, runner=runner, **k: runner)
        pieces: list[str] = []
        result = commands.generate_text(
            out, f"What is {IMAGE_MARKER}?", pieces.append, max_new_tokens=4, backend=backend,
            images=[tmp_path / "b.png"], image_budget=BUDGET,
        )  # fmt: skip
        texts[backend] = (result.tokens, "".join(pieces))
    assert texts["trt"] == texts["ort"] and len(texts["trt"][0]) >= 1


def test_the_staged_image_and_audio_validation_passes_on_the_trt_runner(make_vision_export):
    """validate/images.py and validate/audio.py with the TRT runner (engines for two images of up to 280 soft
    tokens and two 30 s clips, as their synthetic inputs need) as the backend: every stage within its bound or
    transformers' own fp32 noise, greedy tokens identical."""
    import copy

    import torch

    from gemma4_compile.validate.audio import validate_audio
    from gemma4_compile.validate.images import load_reference, validate_images

    ckpt, out = make_vision_export("tiny-e2b")
    limits = ProfileLimits(max_batch=1, max_seq=256, max_images=2, max_image_tokens=280, max_clips=2)
    trt = runner_on_fakes(out, FakeCuda(), limits)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine: no OpenMP spinning
    try:
        hf = load_reference(ckpt)
        hf64 = copy.deepcopy(hf).double()
        reports = [check(trt, hf, hf64, steps=8) for check in (validate_images, validate_audio)]
    finally:
        torch.set_num_threads(threads)
    for report in reports:
        assert report.passed, report.failure()
        assert [s.name for s in report.stages] == ["preprocessing", "encoder", "end-to-end", "greedy"]
        assert report.stages[-1].value == 0  # 8/8 greedy tokens identical


@pytest.mark.parametrize(
    ("encode", "match"),
    [
        ("two_images", r"^trt: 2 images exceed the vision engine's profile \(at most 1; build with a larger --max-images\)$"),
        ("large_image", r"^trt: 2304 patches per image exceed the vision engine's profile \(at most 630; build with a larger --max-image-tokens"),
        ("long_clip", r"^trt: 150 log-mel frames per clip exceed the audio engine's profile \(at most 100; build with a larger BuildOptions.max_frames\)$"),
        ("two_clips", r"^trt: 2 audio clips exceed the audio engine's profile \(at most 1; build with a larger --max-clips\)$"),
    ],
)  # fmt: skip
def test_a_request_beyond_a_tower_profile_is_one_line_naming_the_limit(runners, encode, match):
    _, trt, ort = runners
    mm = ort.manifest.multimodal
    requests = {
        "two_images": lambda: trt.encode_images(*batch_patches(image_patches([picture(40, 60)] * 2, mm, 70))),
        # 600x600 px at 280 soft tokens: 16x16 soft tokens of 3x3 patches
        "large_image": lambda: trt.encode_images(*batch_patches(image_patches([picture(600, 600)], mm, 280))),
        "long_clip": lambda: trt.encode_audio(*batch_features([audio_features(tone(1.5), 16_000)])),
        "two_clips": lambda: trt.encode_audio(*batch_features([audio_features(tone(0.5), 16_000)] * 2)),
    }
    with pytest.raises(RunnerError, match=match):
        requests[encode]()


def test_a_tower_left_out_of_the_build_is_refused_naming_it(runners):
    out, _, _ = runners
    trt = runner_on_fakes(out, FakeCuda(), LIMITS, towers=())  # built with --graphs decoder,embed
    features, mask = batch_features([audio_features(tone(0.5), 16_000)])
    with pytest.raises(
        RunnerError, match=rf"^trt: engine fake has no {AUDIO} engine; build with --graphs including audio$"
    ):
        trt.encode_audio(features, mask)


def _wav(path, samples: np.ndarray):
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(np.clip(np.round(samples * 32768), -32768, 32767).astype("<i2").tobytes())
    return path
