"""Audio clips for prompts on an export, without torch: a WAV file (stdlib `wave`, or its RIFF chunks for float
data) -> log-mel frames (model/audio_preprocess.py, numpy) -> audio.onnx -> soft tokens.

Each clip becomes `boa, audio x n, eoa` in the prompt (runtime/images.py builds it), n = its soft-token count
from the clip's length, known before any encoder runs. Clips must be 16 kHz mono, at most 30 s: resampling and
splitting are left to the caller, as transformers' feature extractor leaves them.
"""

from __future__ import annotations

import io
import struct
import wave
from pathlib import Path

import numpy as np

from ..errors import Gemma4CompileError
from ..export.manifest import ExportManifest
from ..model.audio_config import AudioTokens
from ..model.audio_preprocess import MAX_SAMPLES, SAMPLE_RATE, AudioFeatures, audio_features
from .errors import RuntimeInputError

AUDIO_MARKER = "<|audio|>"
_PCM, _FLOAT = 1, 3  # WAVE format tags


def audio_support(manifest: ExportManifest) -> AudioTokens:
    """The export's audio prompt ids, or a one-line refusal of audio prompts on it."""
    mm = manifest.multimodal
    if mm is None or mm.audio is None:
        raise RuntimeInputError(
            f"{manifest.path} has no audio graph merged into its embed graph (only E2B/E4B have an audio "
            "tower; 26B/31B take text and images)"
        )
    return mm.audio


def load_wav(path: str | Path) -> np.ndarray:
    """The samples of a 16 kHz mono WAV file (PCM16 or float32) as float32 in [-1, 1], or a one-line error
    naming the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise RuntimeInputError(f"audio {path} does not exist")
    if path.is_dir():
        raise RuntimeInputError(f"audio {path} is a directory")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RuntimeInputError(f"cannot read audio {path} ({e.strerror or e})") from None
    return wav_samples(data, f"audio {path}")


def wav_samples(data: bytes, name: str) -> np.ndarray:
    """The samples of WAV bytes (a file's, or a request's base64 payload), checked as `load_wav` says; errors
    name the clip as `name` ("audio a.wav", "message 1, audio part 0")."""
    if not data:
        raise RuntimeInputError(f"{name} is empty (0 bytes)")
    fmt, channels, rate, bits, raw = _riff(data, name)
    if rate != SAMPLE_RATE:
        raise RuntimeInputError(f"{name} is at {rate} Hz; resample it to {SAMPLE_RATE} Hz mono first")
    if channels != 1:
        raise RuntimeInputError(f"{name} has {channels} channels; mix it down to mono first")
    if (fmt, bits) == (_PCM, 16):
        samples = np.frombuffer(raw[: len(raw) // 2 * 2], "<i2").astype(np.float32) / 32768.0
    elif (fmt, bits) == (_FLOAT, 32):
        samples = np.frombuffer(raw[: len(raw) // 4 * 4], "<f4").astype(np.float32)
    else:
        kind = "float" if fmt == _FLOAT else "PCM" if fmt == _PCM else f"format {fmt}"
        raise RuntimeInputError(f"{name} is {bits}-bit {kind}; expected 16-bit PCM or 32-bit float")
    if len(samples) == 0:
        raise RuntimeInputError(f"{name} has no samples")
    if len(samples) > MAX_SAMPLES:
        raise RuntimeInputError(
            f"{name} is {len(samples) / SAMPLE_RATE:.2f} s long; a clip holds at most "
            f"{MAX_SAMPLES // SAMPLE_RATE} s: split it"
        )
    return samples


def _riff(data: bytes, name: str) -> tuple[int, int, int, int, bytes]:
    """(format tag, channels, sample rate, bits per sample, sample bytes) of a WAV file. PCM goes through the
    stdlib `wave` (which checks it); float data, which `wave` refuses, through the chunks themselves."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise RuntimeInputError(f"{name} is not a WAV file (no RIFF/WAVE header)")
    chunks, pos = {}, 12
    while pos + 8 <= len(data):
        tag, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        chunks.setdefault(tag, data[pos + 8 : pos + 8 + size])
        pos += 8 + size + (size & 1)
    fmt = chunks.get(b"fmt ")
    if fmt is None or len(fmt) < 16 or b"data" not in chunks:
        raise RuntimeInputError(f"{name} is a truncated WAV file (no fmt or data chunk)")
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE (which `wave` refuses before 3.12): the
        tag = struct.unpack("<H", fmt[24:26])[0]  # real tag opens the sub-format GUID; read its data chunk
        return tag, channels, rate, bits, chunks[b"data"]
    if tag == _PCM:
        try:
            with wave.open(io.BytesIO(data), "rb") as w:
                raw = w.readframes(w.getnframes())
        except (wave.Error, EOFError) as e:
            raise RuntimeInputError(f"{name} is not a readable WAV file ({e})") from None
        return tag, channels, rate, bits, raw
    return tag, channels, rate, bits, chunks[b"data"]


def audio_clips(paths: list[str | Path]) -> list[AudioFeatures]:
    """Each WAV file's log-mel frames, mask and soft-token count (model/audio_preprocess.py)."""
    return [clip_features(load_wav(path), f"audio {path}") for path in paths]


def clip_features(samples: np.ndarray, name: str) -> AudioFeatures:
    """The log-mel frames, mask and soft-token count of checked samples; a clip too short for one frame is a
    one-line error naming it."""
    try:
        return audio_features(samples, SAMPLE_RATE)
    except Gemma4CompileError as e:
        raise RuntimeInputError(f"{name}: {e}") from None


def audio_run(n: int, tokens: AudioTokens) -> list[int]:
    """The ids of one clip of `n` soft tokens: `boa, audio x n, eoa`."""
    return [tokens.boa, *[tokens.audio] * n, tokens.eoa]
