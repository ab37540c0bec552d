"""Images -> the vision graph's inputs, with numpy and Pillow only (no torch, no transformers at run time).

The same steps as transformers' `Gemma4ImageProcessorPil`: convert to RGB; resize (Pillow bicubic), keeping
the aspect ratio, to the largest size whose sides are multiples of k·p (48 px) and whose patch count fits the
soft-token budget (images smaller than the budget are enlarged); scale to [0, 1]; cut into p×p patches in
row-major order, each flattened as (row, column, channel); positions (x = column, y = row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import Gemma4CompileError
from .vision_config import SOFT_TOKEN_BUDGETS, VisionSpec

__all__ = ["SOFT_TOKEN_BUDGETS", "ImagePatches", "batch_patches", "image_patches", "resized_size"]


@dataclass(frozen=True)
class ImagePatches:
    """One image, unpadded: pixel_values [n, 3p²] float32 in [0, 1] and positions [n, 2] int64 (x, y)."""

    pixel_values: np.ndarray
    positions: np.ndarray
    soft_tokens: int  # n / k²: the number of image placeholders the prompt needs


def resized_size(height: int, width: int, spec: VisionSpec, budget: int) -> tuple[int, int]:
    """(height, width) after the aspect-preserving resize: sides multiples of k·p, at most budget·k² patches."""
    if budget not in SOFT_TOKEN_BUDGETS:
        raise Gemma4CompileError(f"soft-token budget {budget} is not one of {SOFT_TOKEN_BUDGETS}")
    if height < 1 or width < 1:
        raise Gemma4CompileError(f"image of size {width}x{height} has no pixels")
    p, side = spec.patch_size, spec.pooling_kernel_size * spec.patch_size
    max_pixels = budget * spec.patches_per_token * p * p
    factor = math.sqrt(max_pixels / (height * width))
    h = math.floor(factor * height / side) * side
    w = math.floor(factor * width / side) * side
    if h == 0 and w == 0:
        raise Gemma4CompileError(f"image of size {width}x{height} resizes to nothing")
    longest = budget * side  # a one-block-thick strip of the whole budget
    if h == 0:  # a very wide strip: one block high, as wide as its aspect ratio allows
        h, w = side, min(width // height * side, longest)
    elif w == 0:
        h, w = min(height // width * side, longest), side
    return h, w


def image_patches(image: Image.Image, spec: VisionSpec, budget: int = 280) -> ImagePatches:
    """One image as the vision graph takes it, before padding."""
    rgb = image.convert("RGB")
    h, w = resized_size(rgb.height, rgb.width, spec, budget)
    if (h, w) != (rgb.height, rgb.width):
        rgb = rgb.resize((w, h), resample=Image.Resampling.BICUBIC)
    pixels = (np.asarray(rgb).astype(np.float64) * (1 / 255)).astype(np.float32)  # [h, w, 3]
    p = spec.patch_size
    rows, cols = h // p, w // p
    if max(rows, cols) > spec.position_embedding_size:  # the tiny presets' 64-row tables
        raise Gemma4CompileError(
            f"an image of {rgb.width}x{rgb.height} at budget {budget} spans {max(rows, cols)} patches per side; "
            f"this vision tower's position table holds {spec.position_embedding_size}: use a smaller budget"
        )
    patches = pixels.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
    y, x = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    positions = np.stack([x.ravel(), y.ravel()], axis=-1).astype(np.int64)
    return ImagePatches(patches, positions, rows * cols // spec.patches_per_token)


def batch_patches(images: list[ImagePatches], pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stack images for one vision-graph call: right-padded (zero pixels, (-1, -1) positions) to the largest
    image, or to `pad_to` patches (the processor pads to budget·k²)."""
    if not images:
        raise Gemma4CompileError("no images to batch")
    longest = max(len(im.positions) for im in images)
    padded = pad_to or longest
    if padded < longest:
        raise Gemma4CompileError(f"an image has {longest} patches, more than the {padded} to pad to")
    pixels = np.zeros((len(images), padded, images[0].pixel_values.shape[1]), np.float32)
    positions = np.full((len(images), padded, 2), -1, np.int64)
    for i, im in enumerate(images):
        pixels[i, : len(im.positions)] = im.pixel_values
        positions[i, : len(im.positions)] = im.positions
    return pixels, positions
