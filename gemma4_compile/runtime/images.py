"""Image prompts on an export, without torch: images -> patches (numpy + Pillow) -> vision.onnx -> soft tokens,
and the prompt's ids with one placeholder run per image (docs/export-format.md, Multimodal).

Each image becomes `boi, image x n, eoi` where n, its soft-token count, comes from the preprocessing (the
resized size), before any encoder runs. The prompt marks where images go with `<|image|>` (Gemma's image
token string), one per image in order; a prompt without markers gets the images before its text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..export.manifest import ExportManifest, MultimodalSpec
from .errors import RuntimeInputError

IMAGE_MARKER = "<|image|>"


@dataclass(frozen=True)
class ImagePrompt:
    """A prompt's ids (placeholders expanded) and the soft-token rows the embed graph merges into them."""

    ids: list[int]
    image_embeds: np.ndarray | None  # [sum of n, E] in prompt order; None without images


def image_support(manifest: ExportManifest) -> MultimodalSpec:
    """The export's multimodal spec, or a one-line refusal of image prompts on it."""
    mm = manifest.multimodal
    if mm is None:
        raise RuntimeInputError(
            f"{manifest.path} has no vision graph (export a checkpoint with a vision tower)"
        )
    if mm.bidirectional_image_blocks:
        raise RuntimeInputError(
            "image prompts are not supported on this export: its sliding layers attend both ways inside each "
            "image run (26B/31B, mm_block_ids), which the decoder graph does not implement yet; text prompts work"
        )
    return mm


def load_image(path: str | Path) -> Any:
    """A decoded Pillow image, or a one-line error naming the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            if image.width < 1 or image.height < 1:
                raise RuntimeInputError(f"image {path} has no pixels ({image.width}x{image.height})")
            return image.copy()
    except FileNotFoundError:
        raise RuntimeInputError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise RuntimeInputError(f"image {path} is a directory") from None
    except UnidentifiedImageError:
        raise RuntimeInputError(
            f"image {path} is not an image Pillow can read (empty or unknown format)"
        ) from None
    except OSError as e:  # truncated data, permissions
        raise RuntimeInputError(f"cannot read image {path} ({e.strerror or e})") from None


def image_patches(images: Sequence[Any], mm: MultimodalSpec, budget: int) -> list[Any]:
    """Each image's patches and soft-token count (model/vision_preprocess.py, transformers' Pillow processor)."""
    from ..model.vision_preprocess import image_patches as patches_of

    if len(images) > mm.max_images:
        raise RuntimeInputError(
            f"{len(images)} images given; this export takes at most {mm.max_images} per prompt"
        )
    try:
        return [patches_of(im, mm.vision, budget) for im in images]
    except RuntimeInputError:
        raise
    except Exception as e:  # Gemma4CompileError from the resize rule (a budget, a degenerate size)
        raise RuntimeInputError(str(e)) from None


def split_prompt(text: str, n_images: int) -> list[str]:
    """The text around the images: n_images + 1 pieces (markers counted against the images given)."""
    markers = text.count(IMAGE_MARKER)
    if markers == 0:
        return [""] * n_images + [text]
    if markers != n_images:
        raise RuntimeInputError(
            f"the prompt has {markers} {IMAGE_MARKER} markers but {n_images} images were given"
        )
    return text.split(IMAGE_MARKER)


def expand_images(pieces: list[list[int]], counts: Sequence[int], mm: MultimodalSpec) -> list[int]:
    """Token pieces joined by each image's run `boi, image x n, eoi`."""
    t = mm.tokens
    ids = list(pieces[0])
    for n, piece in zip(counts, pieces[1:], strict=True):
        ids += [t.boi, *[t.image] * n, t.eoi, *piece]
    return ids


def encode_with_images(
    tokenizer: Any, text: str, counts: Sequence[int], mm: MultimodalSpec, chat: bool
) -> list[int]:
    """The prompt's ids: `text` (a user turn with `chat`) with each image's placeholder run where it goes."""
    if chat:  # the template wraps the markers with the text; pieces after the first carry no BOS
        text = tokenizer.render_chat([{"role": "user", "content": _with_markers(text, len(counts))}])
        pieces = text.split(IMAGE_MARKER)
        first = tokenizer.encode(pieces[0], add_special_tokens=False)
    else:
        pieces = split_prompt(text, len(counts))
        first = tokenizer.encode(pieces[0])
    rest = [tokenizer.encode(p, add_special_tokens=False) for p in pieces[1:]]
    return expand_images([first, *rest], counts, mm)


def _with_markers(text: str, n_images: int) -> str:
    return IMAGE_MARKER.join(split_prompt(text, n_images))


def soft_token_rows(soft: np.ndarray, soft_len: np.ndarray) -> np.ndarray:
    """vision.onnx's padded outputs [N, T, E] + [N] -> the real rows [sum, E], image after image."""
    return np.concatenate([soft[i, : int(n)] for i, n in enumerate(soft_len)], axis=0)


def image_prompt(
    runner: Any,
    tokenizer: Any,
    text: str,
    image_paths: Sequence[str | Path],
    *,
    chat: bool = False,
    budget: int | None = None,
) -> ImagePrompt:
    """Ids and soft tokens for `text` with the images at `image_paths`, on an OrtRunner's export."""
    if not image_paths:
        ids = tokenizer.encode_chat([{"role": "user", "content": text}]) if chat else tokenizer.encode(text)
        return ImagePrompt(ids, None)
    mm = image_support(runner.manifest)
    images = [load_image(p) for p in image_paths]
    patches = image_patches(images, mm, budget or mm.vision.default_output_length)
    ids = encode_with_images(tokenizer, text, [p.soft_tokens for p in patches], mm, chat)
    from ..model.vision_preprocess import batch_patches

    soft, soft_len = runner.encode_images(*batch_patches(patches))
    return ImagePrompt(ids, soft_token_rows(soft, soft_len))
