"""Our image preprocessing against transformers' `Gemma4ImageProcessorPil` (the Pillow backend).

Wide, tall, tiny (enlarged) and strip images at every soft-token budget: same patches (≤1e-6, observed 0),
same positions, same soft-token counts.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from gemma4_compile.errors import Gemma4CompileError
from gemma4_compile.model.presets import VISION_PRESETS
from gemma4_compile.model.vision_preprocess import (
    SOFT_TOKEN_BUDGETS,
    batch_patches,
    image_patches,
    resized_size,
)

SPEC = VISION_PRESETS["e2b"]  # patch size and pooling kernel are the same for every variant
SHAPES = {
    "photo": (480, 640),
    "tall": (1000, 300),
    "strip": (37, 900),
    "tiny": (20, 28),
    "grey 96x144": (96, 144),
}
ATOL = 1e-6


def _image(height: int, width: int, name: str) -> Image.Image:
    rng = np.random.default_rng(height * 1000 + width)
    if name.startswith("grey"):  # a mode other than RGB: both sides convert it
        return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), mode="L")
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("budget", SOFT_TOKEN_BUDGETS)
@pytest.mark.parametrize("name", SHAPES)
def test_patches_positions_and_counts_match_transformers(name, budget):
    image = _image(*SHAPES[name], name)
    ref = Gemma4ImageProcessorPil(max_soft_tokens=budget)(images=[image], return_tensors="np")
    ours = image_patches(image, SPEC, budget)
    pixels, positions = batch_patches([ours], pad_to=budget * 9)  # the processor pads to the budget
    assert ours.soft_tokens == ref["num_soft_tokens_per_image"][0] <= budget
    np.testing.assert_array_equal(positions, ref["image_position_ids"])
    assert np.abs(pixels - ref["pixel_values"]).max() <= ATOL


def test_resized_sizes_of_the_multimodal_note():
    """docs: 480x640 at budget 280 gives 266 soft tokens; 1000x300 270; 96x144 at 70 gives 60."""
    for (h, w), budget, tokens in (((480, 640), 280, 266), ((1000, 300), 280, 270), ((96, 144), 70, 60)):
        rh, rw = resized_size(h, w, SPEC, budget)
        assert rh % 48 == 0 and rw % 48 == 0 and (rh // 48) * (rw // 48) == tokens


def test_batch_pads_to_the_largest_image_with_minus_one_positions():
    wide, square = (image_patches(_image(h, w, "x"), SPEC, 70) for h, w in ((37, 900), (96, 144)))
    n_wide, n_square = len(wide.positions), len(square.positions)
    assert n_wide < n_square and n_wide % 9 == 0 == n_square % 9
    pixels, positions = batch_patches([wide, square])
    assert pixels.shape == (2, n_square, 768)
    assert (positions[0, n_wide:] == -1).all() and not pixels[0, n_wide:].any()
    np.testing.assert_array_equal(positions[1], square.positions)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: resized_size(10, 10, SPEC, 100), "budget 100 is not one of"),
        (lambda: resized_size(0, 10, SPEC, 280), "has no pixels"),
        (lambda: batch_patches([]), "no images"),
    ],
)
def test_bad_input_is_a_one_line_error(call, match):
    with pytest.raises(Gemma4CompileError, match=match) as e:
        call()
    assert "\n" not in str(e.value)
