"""Our numpy log-mel front end against transformers' `Gemma4AudioFeatureExtractor`.

Sine + noise clips from 0.1 s to 30 s, alone and as a padded batch: same features (≤1e-6, observed 0.0),
same mask, same frame count, and the soft-token count the processor puts in the prompt.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

from gemma4_compile.errors import Gemma4CompileError
from gemma4_compile.model.audio_preprocess import (
    MAX_SAMPLES,
    audio_features,
    batch_features,
    frame_count,
)

ATOL = 1e-6
SECONDS = (0.1, 0.61, 1.0, 7.3, 30.0)


@pytest.fixture(scope="module")
def extractor():
    return Gemma4AudioFeatureExtractor()


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    n = round(seconds * 16_000)
    t = np.arange(n) / 16_000
    noise = np.random.default_rng(seed).standard_normal(n)
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * noise).astype(np.float32)


def processor_soft_tokens(mask: np.ndarray) -> int:
    """The audio placeholders transformers' processor writes for a clip (`replace_audio_token`)."""
    stub = SimpleNamespace(boa_token="<", eoa_token=">", audio_token="A")
    return Gemma4Processor.replace_audio_token(stub, {"input_features_mask": [mask]}, 0).count("A")


@pytest.mark.parametrize("seconds", SECONDS)
def test_features_mask_and_counts_match_transformers(extractor, seconds):
    wave = clip(seconds)
    ref = extractor([wave], return_tensors="np")
    ours = audio_features(wave, 16_000)
    features, mask = batch_features([ours])
    assert features.shape == ref["input_features"].shape == (1, frame_count(len(wave)), 128)
    np.testing.assert_array_equal(mask, ref["input_features_mask"])
    assert np.abs(features - ref["input_features"]).max() <= ATOL
    assert ours.soft_tokens == processor_soft_tokens(ref["input_features_mask"][0])


def test_thirty_seconds_gives_the_750_token_cap():
    assert audio_features(clip(30.0), 16_000).soft_tokens == 750


def test_padded_batch_matches_transformers(extractor):
    waves = [clip(s, seed=i) for i, s in enumerate((1.0, 0.37, 2.5))]
    ref = extractor(waves, return_tensors="np")
    parts = [audio_features(w, 16_000) for w in waves]
    features, mask = batch_features(parts)
    np.testing.assert_array_equal(mask, ref["input_features_mask"])
    assert np.abs(features - ref["input_features"]).max() <= ATOL
    assert [p.soft_tokens for p in parts] == [processor_soft_tokens(m) for m in ref["input_features_mask"]]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: audio_features(np.zeros(MAX_SAMPLES + 1, np.float32), 16_000),
            r"30.00 s long; .* at most 30 s",
        ),
        (lambda: audio_features(clip(1.0), 44_100), "at 44100 Hz: resample it to 16000 Hz"),
        (lambda: audio_features(np.zeros((2, 1600), np.float32), 16_000), "one channel of float samples"),
        (lambda: audio_features(np.zeros(1600, np.int16), 16_000), "one channel of float samples"),
        (lambda: audio_features(np.zeros(160, np.float32), 16_000), "too short for one 20 ms frame"),
        (lambda: batch_features([]), "no audio clips"),
    ],
)
def test_bad_input_is_a_one_line_error(call, match):
    with pytest.raises(Gemma4CompileError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


def test_the_front_end_imports_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = (
        "import sys; import gemma4_compile.model.audio_preprocess; "
        "print([m for m in ('torch', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
