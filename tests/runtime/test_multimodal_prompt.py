"""Image prompts in the runtime (no torch): the prompt builder, `generate --image` on a tiny-e2b export, and
the one-line refusals (bad image files, too many images, markers that do not match, 26B/31B exports)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from gemma4_compile.export.manifest import MultimodalSpec
from gemma4_compile.model.presets import VISION_PRESETS
from gemma4_compile.model.vision_config import ImageTokens
from gemma4_compile.runtime.errors import RuntimeInputError
from gemma4_compile.runtime.images import (
    IMAGE_MARKER,
    encode_with_images,
    expand_images,
    image_patches,
    image_support,
    load_image,
    split_prompt,
)

REPO = Path(__file__).resolve().parents[2]
MM = MultimodalSpec(VISION_PRESETS["tiny-e2b"], ImageTokens(boi=5, eoi=6), bidirectional_image_blocks=False)


class FakeTokenizer:
    """One id per character (100 + ord), BOS 2 when special tokens are added."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [2] * add_special_tokens + [100 + ord(c) for c in text]

    def render_chat(self, messages):
        return f"<turn>{messages[0]['content']}</turn>"


def test_each_image_becomes_boi_n_placeholders_eoi_where_its_marker_is():
    ids = encode_with_images(FakeTokenizer(), f"a{IMAGE_MARKER}b{IMAGE_MARKER}", [2, 3], MM, chat=False)
    a, b, img = 100 + ord("a"), 100 + ord("b"), MM.tokens.image
    assert ids == [2, a, 5, img, img, 6, b, 5, img, img, img, 6]


def test_without_markers_the_images_come_first_and_chat_wraps_them():
    ids = encode_with_images(FakeTokenizer(), "q", [1], MM, chat=True)
    text = [100 + ord(c) for c in "<turn>"]
    assert ids == [*text, 5, MM.tokens.image, 6, 100 + ord("q"), *[100 + ord(c) for c in "</turn>"]]
    assert expand_images([[7], [8]], [0], MM) == [7, 5, 6, 8]


def test_markers_that_do_not_match_the_images_are_one_line_errors():
    with pytest.raises(RuntimeInputError, match=r"has 2 <\|image\|> markers but 1 images were given"):
        split_prompt(f"{IMAGE_MARKER} and {IMAGE_MARKER}", 1)
    assert split_prompt("text", 2) == ["", "", "text"]


def test_soft_token_count_comes_from_the_preprocessing_before_any_encoder():
    image = Image.fromarray(np.zeros((96, 144, 3), np.uint8))
    (patches,) = image_patches([image], MM, budget=70)
    assert patches.soft_tokens == 60  # 288x432 px: 6x9 blocks of 3x3 patches
    with pytest.raises(RuntimeInputError, match="at most 8 per prompt"):
        image_patches([image] * 9, MM, budget=70)


def _decoder(*inputs: str) -> dict:
    return {"decoder": SimpleNamespace(inputs=[SimpleNamespace(name=n) for n in inputs])}


def test_bidirectional_image_blocks_need_the_decoder_input_naming_why():
    """26B/31B exports take image prompts when their decoder has mm_block_ids; older ones are refused."""
    mm = dataclasses.replace(MM, bidirectional_image_blocks=True)
    old = SimpleNamespace(multimodal=mm, path="out", graphs=_decoder("inputs_embeds", "past_len"))
    with pytest.raises(RuntimeInputError, match="predates mm_block_ids.*re-export it") as e:
        image_support(old)
    assert "\n" not in str(e.value)
    new = SimpleNamespace(multimodal=mm, path="out", graphs=_decoder("inputs_embeds", "mm_block_ids"))
    assert image_support(new) is mm
    assert image_support(SimpleNamespace(multimodal=MM, path="out", graphs=_decoder("x"))) is MM
    with pytest.raises(RuntimeInputError, match="has no vision graph"):
        image_support(SimpleNamespace(multimodal=None, path="out"))


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "does not exist"), (b"", "not an image Pillow can read"), (b"not a png", "not an image Pillow")],
)
def test_unreadable_images_are_one_line_errors(tmp_path, content, match):
    path = tmp_path / "x.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RuntimeInputError, match=match) as e:
        load_image(path)
    assert "\n" not in str(e.value)


# ----- the CLI on a real export ---------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gemma4_compile.cli", *args], capture_output=True, text=True, cwd=REPO
    )


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in result.stderr.strip().splitlines() if not re.match(r"^[WI]\d{4} ", ln)]
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def vision_export(make_vision_export, tmp_path_factory):
    _, out = make_vision_export("tiny-e2b")
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), np.uint8)).save(folder / "a.png")
    (folder / "empty.png").write_bytes(b"")
    return out, folder


def test_generate_with_an_image_runs_vision_embed_and_decoder(vision_export):
    out, folder = vision_export
    args = ("generate", str(out), "--prompt", f"Look: {IMAGE_MARKER} what?", "--max-new-tokens", "4")
    result = _cli(*args, "--image", str(folder / "a.png"), "--image-budget", "70", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "4 tokens (length)" in result.stderr


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--image", "empty.png"], "not an image Pillow can read"),
        (["--image", "missing.png"], "does not exist"),
        (["--image", "a.png", "--image", "a.png"], "1 <|image|> markers but 2 images"),
        (["--image", "a.png"] * 9, "at most 8 per prompt"),
    ],
)
def test_generate_refuses_bad_images_in_one_line(vision_export, extra, match):
    out, folder = vision_export
    extra = [str(folder / a) if a.endswith(".png") else a for a in extra]
    result = _cli("generate", str(out), "--prompt", f"x {IMAGE_MARKER}", "--image-budget", "70", *extra)
    assert match in _error_line(result)
