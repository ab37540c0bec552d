"""Waveforms -> the audio graph's inputs, with numpy only (no torch, no transformers at run time).

The same steps, in the same dtypes, as transformers' `Gemma4AudioFeatureExtractor`: 16 kHz mono, float32;
right-pad to a multiple of 128 samples; prepend 160 zeros (semicausal); frames of 321 samples every 160,
the last sample dropped; periodic Hann window (320); |rfft| with n = 512 (magnitude, not power); a 128-bin
HTK mel bank from 0 to 8 kHz (unnormalised); log(mel + 1e-3). A frame is valid iff its last sample is real
audio; invalid frames are zero. Resampling to 16 kHz is the caller's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from ..errors import Gemma4CompileError
from .audio_config import MEL_BINS

SAMPLE_RATE = 16_000
FRAME_LENGTH = 320  # 20 ms
HOP_LENGTH = 160  # 10 ms
FFT_LENGTH = 512
PAD_TO_MULTIPLE_OF = 128  # samples
MAX_SAMPLES = 480_000  # 30 s; the extractor would truncate, we refuse
MEL_FLOOR = 1e-3
F_MIN, F_MAX = 0.0, 8000.0


@dataclass(frozen=True)
class AudioFeatures:
    """One clip, unpadded: features [T, 128] float32 (zero on invalid frames) and mask [T] bool."""

    features: np.ndarray
    mask: np.ndarray
    soft_tokens: int  # audio placeholders the prompt needs: valid frames after the two stride-2 convs


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray | float:
    return 2595.0 * np.log10(1.0 + hz / 700.0)  # HTK


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (np.power(10, mel / 2595.0) - 1.0)


@cache
def mel_filters() -> np.ndarray:
    """[257, 128] float64 triangles over the rfft bins, their corners evenly spaced in HTK mel from 0 to 8 kHz."""
    corners = _mel_to_hz(np.linspace(_hz_to_mel(F_MIN), _hz_to_mel(F_MAX), MEL_BINS + 2))  # [130] Hz
    bins = np.linspace(0, SAMPLE_RATE // 2, FFT_LENGTH // 2 + 1)  # [257] Hz
    slopes = corners[None, :] - bins[:, None]  # [257, 130]
    widths = np.diff(corners)
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    return np.maximum(np.zeros(1), np.minimum(rising, falling))


@cache
def hann_window() -> np.ndarray:
    """Periodic Hann window of FRAME_LENGTH samples, float32."""
    return np.hanning(FRAME_LENGTH + 1)[:-1].astype(np.float32)


def frame_count(samples: int) -> int:
    """Mel frames of a clip of `samples` samples, after padding it to a multiple of 128."""
    padded = -(-samples // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF
    return max(0, (padded + FRAME_LENGTH // 2 - (FRAME_LENGTH + 1)) // HOP_LENGTH + 1)


def soft_token_count(valid_frames: int) -> int:
    """Soft tokens of `valid_frames` valid mel frames: ceil(ceil(T / 2) / 2), one per 40 ms."""
    return ((valid_frames + 1) // 2 + 1) // 2


def audio_features(waveform: np.ndarray, sample_rate: int) -> AudioFeatures:
    """One mono clip at 16 kHz, at most 30 s, as the audio graph takes it before batching."""
    wave = _checked_waveform(waveform, sample_rate)
    frames = frame_count(len(wave))
    real = np.zeros(frames * HOP_LENGTH + FRAME_LENGTH + 1, dtype=bool)  # which padded samples are audio
    real[FRAME_LENGTH // 2 : FRAME_LENGTH // 2 + len(wave)] = True
    padded = np.zeros(len(real), dtype=np.float32)
    padded[FRAME_LENGTH // 2 : FRAME_LENGTH // 2 + len(wave)] = wave
    starts = np.arange(frames) * HOP_LENGTH
    windows = padded[starts[:, None] + np.arange(FRAME_LENGTH)]  # [T, 320]: the 321st sample is dropped
    spectrum = np.abs(np.fft.rfft(windows * hann_window(), n=FFT_LENGTH, axis=-1))  # [T, 257]
    log_mel = np.log(spectrum @ mel_filters() + np.float64(MEL_FLOOR)).astype(np.float32)
    mask = real[starts + FRAME_LENGTH]  # valid iff the frame's last sample (index 320) is real
    return AudioFeatures(log_mel * mask[:, None], mask, soft_token_count(int(mask.sum())))


def _checked_waveform(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    if sample_rate != SAMPLE_RATE:
        raise Gemma4CompileError(f"audio at {sample_rate} Hz: resample it to {SAMPLE_RATE} Hz first")
    wave = np.asarray(waveform)
    if wave.ndim != 1 or not np.issubdtype(wave.dtype, np.floating):
        raise Gemma4CompileError(
            f"audio must be one channel of float samples, got {wave.dtype} {list(wave.shape)}"
        )
    if len(wave) > MAX_SAMPLES:
        raise Gemma4CompileError(
            f"audio is {len(wave) / SAMPLE_RATE:.2f} s long; a clip holds at most {MAX_SAMPLES // SAMPLE_RATE} s"
            f" ({MAX_SAMPLES} samples): split it"
        )
    if len(wave) <= FRAME_LENGTH // 2:  # no frame ends on a real sample
        raise Gemma4CompileError(f"audio of {len(wave)} samples is too short for one 20 ms frame")
    return wave.astype(np.float32)


def batch_features(clips: list[AudioFeatures]) -> tuple[np.ndarray, np.ndarray]:
    """Stack clips for one audio-graph call, right-padded with invalid zero frames to the longest:
    features [B, T, 128] float32 and mask [B, T] bool (as the extractor pads a batch)."""
    if not clips:
        raise Gemma4CompileError("no audio clips to batch")
    frames = max(len(c.mask) for c in clips)
    features = np.zeros((len(clips), frames, MEL_BINS), np.float32)
    mask = np.zeros((len(clips), frames), bool)
    for i, c in enumerate(clips):
        features[i, : len(c.mask)] = c.features
        mask[i, : len(c.mask)] = c.mask
    return features, mask
