"""Audio prompts in the runtime (no torch): the WAV reader, the prompt builder with images and clips, `generate
--audio` on the shared tiny-e2b vision+audio export, and the one-line refusals (bad WAV files, wrong rate, too
long, markers that do not match, exports without an audio tower)."""

from __future__ import annotations

import dataclasses
import re
import struct
import wave
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gemma4_compile.cli import main
from gemma4_compile.export.manifest import MultimodalSpec
from gemma4_compile.model.audio_config import AudioTokens
from gemma4_compile.model.audio_preprocess import soft_token_count
from gemma4_compile.model.presets import VISION_PRESETS
from gemma4_compile.model.vision_config import ImageTokens
from gemma4_compile.runtime.audio import AUDIO_MARKER, audio_clips, audio_support, load_wav
from gemma4_compile.runtime.errors import RuntimeInputError
from gemma4_compile.runtime.images import IMAGE_MARKER, encode_with_media, image_run

AUDIO = AudioTokens(boa=7, eoa=8)
MM = MultimodalSpec(VISION_PRESETS["tiny-e2b"], ImageTokens(boi=5, eoi=6), False, audio=AUDIO)


def write_pcm16(path: Path, samples: np.ndarray, rate: int = 16_000, channels: int = 1) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.clip(np.round(samples * 32768), -32768, 32767).astype("<i2").tobytes())
    return path


def write_float32(path: Path, samples: np.ndarray, rate: int = 16_000) -> Path:
    """A WAVE_FORMAT_IEEE_FLOAT file (which the stdlib `wave` cannot write or read)."""
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = (
        b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    )
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def write_extensible_pcm16(path: Path, samples: np.ndarray) -> Path:
    """A WAVE_FORMAT_EXTENSIBLE PCM16 file (the stdlib `wave` of Python 3.11 refuses it)."""
    data = np.clip(np.round(samples * 32768), -32768, 32767).astype("<i2").tobytes()
    guid_rest = bytes.fromhex("000000001000800000aa00389b71")  # KSDATAFORMAT_SUBTYPE_PCM after its tag
    fmt = struct.pack("<HHIIHHHHIH", 0xFFFE, 1, 16_000, 32_000, 2, 16, 22, 16, 4, 1) + guid_rest
    body = (
        b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    )
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


class FakeTokenizer:
    """One id per character (100 + ord), BOS 2 when special tokens are added."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [2] * add_special_tokens + [100 + ord(c) for c in text]


def test_pcm16_and_float32_wavs_read_as_the_same_samples(tmp_path):
    wave_in = tone(0.25)
    pcm = load_wav(write_pcm16(tmp_path / "a.wav", wave_in))
    flt = load_wav(write_float32(tmp_path / "b.wav", wave_in))
    assert pcm.dtype == flt.dtype == np.float32 and len(pcm) == len(flt) == 4000
    np.testing.assert_array_equal(flt, wave_in)
    assert np.abs(pcm - wave_in).max() <= 0.5 / 32768 + 1e-9  # rounded to the PCM16 grid
    np.testing.assert_array_equal(load_wav(write_extensible_pcm16(tmp_path / "c.wav", wave_in)), pcm)
    (clip,) = audio_clips([tmp_path / "a.wav"])
    assert clip.soft_tokens == soft_token_count(int(clip.mask.sum())) == 6  # 250 ms: 24 frames end on audio


def test_images_and_clips_expand_where_their_markers_are_and_unmarked_ones_come_first():
    img, aud, a = MM.tokens.image, AUDIO.audio, 100 + ord("a")
    runs = {IMAGE_MARKER: [image_run(1, MM)], AUDIO_MARKER: [[7, aud, aud, 8]]}
    ids = encode_with_media(FakeTokenizer(), f"a{AUDIO_MARKER}a{IMAGE_MARKER}", runs, chat=False)
    assert ids == [2, a, 7, aud, aud, 8, a, 5, img, 6]
    ids = encode_with_media(FakeTokenizer(), "a", runs, chat=False)  # no markers: images, then audio
    assert ids == [2, 5, img, 6, 7, aud, aud, 8, a]
    with pytest.raises(RuntimeInputError, match=r"has 2 <\|audio\|> markers but 1 audio clips were given"):
        encode_with_media(FakeTokenizer(), f"{AUDIO_MARKER}{AUDIO_MARKER}", runs, chat=False)


def test_exports_without_an_audio_tower_refuse_audio_prompts_naming_why():
    manifest = SimpleNamespace(multimodal=dataclasses.replace(MM, audio=None), path="out")
    with pytest.raises(RuntimeInputError, match="has no audio graph.*26B/31B") as e:
        audio_support(manifest)
    assert "\n" not in str(e.value)
    assert audio_support(SimpleNamespace(multimodal=MM, path="out")) == AUDIO


# ----- bad files: one line naming the file and the problem ----------------------------------------------------


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    (folder / "empty.wav").write_bytes(b"")
    (folder / "text.wav").write_bytes(b"not a wav file at all")
    (folder / "cut.wav").write_bytes(write_pcm16(folder / "tmp.wav", tone(0.1)).read_bytes()[:30])
    return {
        "missing": (folder / "missing.wav", "does not exist"),
        "empty": (folder / "empty.wav", "is empty (0 bytes)"),
        "not a wav": (folder / "text.wav", "is not a WAV file"),
        "truncated": (folder / "cut.wav", "truncated WAV file"),
        "8 kHz": (
            write_pcm16(folder / "8k.wav", tone(0.2), rate=8000),
            "is at 8000 Hz; resample it to 16000",
        ),
        "stereo": (write_pcm16(folder / "st.wav", np.repeat(tone(0.2), 2), channels=2), "has 2 channels"),
        "31 s": (
            write_pcm16(folder / "long.wav", np.zeros(31 * 16_000)),
            "31.00 s long; a clip holds at most 30 s",
        ),
        "no samples": (write_pcm16(folder / "zero.wav", np.zeros(0)), "has no samples"),
        "5 ms": (write_pcm16(folder / "short.wav", tone(0.005)), "too short for one 20 ms frame"),
    }


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return _bad_files(tmp_path_factory.mktemp("wavs"))


@pytest.mark.parametrize(
    "case", ["missing", "empty", "not a wav", "truncated", "8 kHz", "stereo", "31 s", "no samples", "5 ms"]
)
def test_bad_wav_files_are_one_line_errors(bad_files, case):
    path, match = bad_files[case]
    with pytest.raises(RuntimeInputError, match=re.escape(match)) as e:
        audio_clips([path])
    assert "\n" not in str(e.value) and str(path) in str(e.value)


# ----- the CLI on the shared tiny-e2b vision+audio export ---------------------------------------------------


@pytest.fixture(scope="module")
def media(make_vision_export, tmp_path_factory):
    from PIL import Image

    _, out = make_vision_export("tiny-e2b")
    folder = tmp_path_factory.mktemp("media")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), np.uint8)).save(folder / "a.png")
    write_pcm16(folder / "a.wav", tone(0.5))
    return out, folder


def test_generate_with_audio_and_an_image_runs_both_encoders_embed_and_decoder(media):
    from gemma4_compile.export.manifest import ExportManifest
    from gemma4_compile.runtime.commands import generate_text
    from gemma4_compile.runtime.images import image_patches, load_image
    from gemma4_compile.runtime.tokenizer import TextTokenizer

    out, folder = media
    result = generate_text(
        out, f"Hear {AUDIO_MARKER} and see {IMAGE_MARKER}: what?", lambda s: None, max_new_tokens=4, threads=1,
        audio=[folder / "a.wav"], images=[folder / "a.png"], image_budget=70,
    )  # fmt: skip
    tok = TextTokenizer(out)
    text = len(tok.encode("Hear ")) + sum(
        len(tok.encode(p, add_special_tokens=False)) for p in (" and see ", ": what?")
    )
    (clip,) = audio_clips([folder / "a.wav"])
    mm = ExportManifest.load(out).multimodal
    (patches,) = image_patches([load_image(folder / "a.png")], mm, 70)
    assert clip.soft_tokens == 13  # 500 ms: one per 40 ms
    assert result.prompt_tokens == text + (clip.soft_tokens + 2) + (patches.soft_tokens + 2)
    assert len(result.tokens) == 4 and result.finish_reason == "length"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--audio", "empty.wav"], "is empty (0 bytes)"),
        (["--audio", "8k.wav"], "is at 8000 Hz"),
        (["--audio", "long.wav"], "a clip holds at most 30 s"),
        (["--audio", "a.wav", "--audio", "a.wav"], "has 1 <|audio|> markers but 2 audio clips were given"),
    ],
)
def test_generate_refuses_bad_audio_in_one_line_and_writes_nothing(media, bad_files, capfd, extra, match):
    out, folder = media
    names = {p.name: p for p, _ in bad_files.values()} | {"a.wav": folder / "a.wav"}
    args = [str(names[a]) if a.endswith(".wav") else a for a in extra]
    code = main(["generate", str(out), "--prompt", f"x {AUDIO_MARKER}", "--threads", "1", *args])
    captured = capfd.readouterr()
    lines = [ln for ln in captured.err.strip().splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], (
        captured.err
    )
    assert captured.out == ""
