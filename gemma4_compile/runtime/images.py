"""Image (and audio) prompts on an export, without torch: images -> patches (numpy + Pillow) -> vision.onnx ->
soft tokens, clips -> log-mel -> audio.onnx -> soft tokens (runtime/audio.py), and the prompt's ids with one
placeholder run per image or clip (docs/export-format.md, Multimodal).

Each image becomes `boi, image x n, eoi` where n, its soft-token count, comes from the preprocessing (the
resized size), before any encoder runs; each clip `boa, audio x n, eoa` likewise from its length. The prompt
marks where they go with `<|image|>` / `<|audio|>` (Gemma's token strings), one per item in order; a prompt
without markers of a kind gets those items before its text (images first).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..export.manifest import DECODER, MM_BLOCK_IDS, ExportManifest, MultimodalSpec
from .audio import AUDIO_MARKER, audio_clips, audio_run, audio_support
from .errors import RuntimeInputError

IMAGE_MARKER = "<|image|>"
MARKER_NOUNS = {IMAGE_MARKER: "images", AUDIO_MARKER: "audio clips"}


@dataclass(frozen=True)
class MediaPrompt:
    """A prompt's ids (placeholders expanded) and the soft-token rows the embed graph merges into them."""

    ids: list[int]
    image_embeds: np.ndarray | None  # [sum of n, E] in prompt order; None without images
    audio_embeds: np.ndarray | None = None  # likewise for audio clips


def image_support(manifest: ExportManifest) -> MultimodalSpec:
    """The export's multimodal spec, or a one-line refusal of image prompts on it."""
    mm = manifest.multimodal
    if mm is None:
        raise RuntimeInputError(
            f"{manifest.path} has no vision graph (export a checkpoint with a vision tower)"
        )
    if mm.bidirectional_image_blocks and MM_BLOCK_IDS not in {
        t.name for t in manifest.graphs[DECODER].inputs
    }:
        raise RuntimeInputError(
            f"{manifest.path} predates mm_block_ids: its sliding layers attend both ways inside each image run "
            "(26B/31B), which its decoder graph cannot; re-export it for image prompts (text prompts work)"
        )
    return mm


def load_image(path: str | Path) -> Any:
    """A decoded Pillow image, or a one-line error naming the file."""
    path = Path(path)
    try:
        return decode_image(path.read_bytes(), f"image {path}")
    except FileNotFoundError:
        raise RuntimeInputError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise RuntimeInputError(f"image {path} is a directory") from None
    except OSError as e:  # permissions
        raise RuntimeInputError(f"cannot read image {path} ({e.strerror or e})") from None


def decode_image(data: bytes, name: str) -> Any:
    """A decoded Pillow image from encoded bytes (a file's, or a request's data URL), or a one-line error
    naming it as `name`."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.width < 1 or image.height < 1:
                raise RuntimeInputError(f"{name} has no pixels ({image.width}x{image.height})")
            return image.copy()
    except UnidentifiedImageError:
        raise RuntimeInputError(f"{name} is not an image Pillow can read (empty or unknown format)") from None
    except OSError as e:  # truncated data
        raise RuntimeInputError(f"cannot read {name} ({e.strerror or e})") from None


def image_patches(
    images: Sequence[Any], mm: MultimodalSpec, budget: int | Sequence[int | None] | None = None
) -> list[Any]:
    """Each image's patches and soft-token count (model/vision_preprocess.py, transformers' Pillow processor),
    at one budget or one per image (None: the export's default)."""
    from ..model.vision_preprocess import image_patches as patches_of

    if len(images) > mm.max_images:
        raise RuntimeInputError(
            f"{len(images)} images given; this export takes at most {mm.max_images} per prompt"
        )
    budgets = list(budget) if isinstance(budget, Sequence) else [budget] * len(images)
    try:
        return [
            patches_of(im, mm.vision, b or mm.vision.default_output_length) for im, b in zip(images, budgets)
        ]
    except RuntimeInputError:
        raise
    except Exception as e:  # Gemma4CompileError from the resize rule (a budget, a degenerate size)
        raise RuntimeInputError(str(e)) from None


def with_markers(text: str, counts: dict[str, int]) -> str:
    """`text` with one marker per item: its own (as many as the items of that kind), or, where it has none of
    a kind, that kind's markers before it (in `counts` order)."""
    prefix = ""
    for marker, n in counts.items():
        found = text.count(marker)
        if found == 0:
            prefix += marker * n
        elif found != n:
            raise RuntimeInputError(
                f"the prompt has {found} {marker} markers but {n} {MARKER_NOUNS[marker]} were given"
            )
    return prefix + text


def split_prompt(text: str, n_images: int) -> list[str]:
    """The text around the images: n_images + 1 pieces (markers counted against the images given)."""
    return with_markers(text, {IMAGE_MARKER: n_images}).split(IMAGE_MARKER)


def image_run(n: int, mm: MultimodalSpec) -> list[int]:
    """The ids of one image of `n` soft tokens: `boi, image x n, eoi`."""
    t = mm.tokens
    return [t.boi, *[t.image] * n, t.eoi]


def expand_images(pieces: list[list[int]], counts: Sequence[int], mm: MultimodalSpec) -> list[int]:
    """Token pieces joined by each image's run `boi, image x n, eoi`."""
    return join_runs(pieces, [image_run(n, mm) for n in counts])


def join_runs(pieces: list[list[int]], runs: Sequence[list[int]]) -> list[int]:
    """Token pieces joined by the placeholder runs: piece 0, run 0, piece 1, ..."""
    ids = list(pieces[0])
    for run, piece in zip(runs, pieces[1:], strict=True):
        ids += [*run, *piece]
    return ids


def encode_with_media(tokenizer: Any, text: str, runs: dict[str, list[list[int]]], chat: bool) -> list[int]:
    """The prompt's ids: `text` (a user turn with `chat`) with each item's placeholder run where its marker
    goes. `runs`: per marker, the runs of its items in order (kinds without items are left out)."""
    runs = {m: r for m, r in runs.items() if r}
    text = with_markers(text, {m: len(r) for m, r in runs.items()})
    if chat:  # the template wraps the markers with the text; pieces after the first carry no BOS
        text = tokenizer.render_chat([{"role": "user", "content": text}])
    return split_and_join(tokenizer, text, runs, bos=not chat)


def split_and_join(tokenizer: Any, text: str, runs: dict[str, list[list[int]]], bos: bool) -> list[int]:
    """Ids of `text` whose markers are replaced, in order, by their items' placeholder runs; `bos`: the first
    piece gets the tokenizer's special tokens (a rendered chat has its own)."""
    runs = {m: r for m, r in runs.items() if r}
    if not runs:
        return tokenizer.encode(text, add_special_tokens=bos)
    pieces = re.split("(" + "|".join(map(re.escape, runs)) + ")", text)
    queues = {m: iter(r) for m, r in runs.items()}
    first = tokenizer.encode(pieces[0], add_special_tokens=bos)
    rest = [tokenizer.encode(p, add_special_tokens=False) for p in pieces[2::2]]
    return join_runs([first, *rest], [next(queues[m]) for m in pieces[1::2]])


def encode_with_images(
    tokenizer: Any, text: str, counts: Sequence[int], mm: MultimodalSpec, chat: bool
) -> list[int]:
    """The prompt's ids: `text` (a user turn with `chat`) with each image's placeholder run where it goes."""
    return encode_with_media(tokenizer, text, {IMAGE_MARKER: [image_run(n, mm) for n in counts]}, chat)


def soft_token_rows(soft: np.ndarray, soft_len: np.ndarray) -> np.ndarray:
    """vision.onnx's (or audio.onnx's) padded outputs [N, T, E] + [N] -> the real rows [sum, E], item after
    item."""
    return np.concatenate([soft[i, : int(n)] for i, n in enumerate(soft_len)], axis=0)


def media_prompt(
    runner: Any,
    tokenizer: Any,
    text: str,
    image_paths: Sequence[str | Path],
    *,
    chat: bool = False,
    budget: int | None = None,
    audio_paths: Sequence[str | Path] = (),
) -> MediaPrompt:
    """Ids and soft tokens for `text` with the images at `image_paths` and the WAV clips at `audio_paths`, on
    an OrtRunner's export. Everything the prompt needs is checked before any encoder runs."""
    if not image_paths and not audio_paths:
        ids = tokenizer.encode_chat([{"role": "user", "content": text}]) if chat else tokenizer.encode(text)
        return MediaPrompt(ids, None)
    images = [load_image(p) for p in image_paths]
    clips = audio_clips(list(audio_paths)) if audio_paths else []
    patches, runs = _media_runs(runner.manifest, images, clips, budget)
    ids = encode_with_media(tokenizer, text, runs, chat)
    return MediaPrompt(ids, _image_rows(runner, patches), _audio_rows(runner, clips))


def chat_media_prompt(
    runner: Any, tokenizer: Any, messages: list[dict[str, Any]], images: list[Any], clips: list[Any],
    budgets: Sequence[int | None] | None = None,
) -> MediaPrompt:  # fmt: skip
    """Ids and soft tokens of a conversation whose message texts hold one marker per decoded image / clip, in
    order (the server puts each where its content part was); `budgets`: per image, None for the export's
    default. Checked before any encoder runs."""
    patches, runs = _media_runs(runner.manifest, images, clips, budgets)
    for marker, items in runs.items():
        found = sum(str(m["content"]).count(marker) for m in messages)
        if found != len(items):
            raise RuntimeInputError(
                f"the messages have {found} {marker} markers but {len(items)} {MARKER_NOUNS[marker]} were given"
            )
    ids = split_and_join(tokenizer, tokenizer.render_chat(messages), runs, bos=False)
    return MediaPrompt(ids, _image_rows(runner, patches), _audio_rows(runner, clips))


def _media_runs(
    manifest: ExportManifest, images: list[Any], clips: list[Any], budget: int | Sequence[int | None] | None
) -> tuple[list[Any], dict[str, list[list[int]]]]:
    """The images' patches and each kind's placeholder runs, refusing what the export cannot take."""
    runs: dict[str, list[list[int]]] = {IMAGE_MARKER: [], AUDIO_MARKER: []}
    patches = []
    if images:
        mm = image_support(manifest)
        patches = image_patches(images, mm, budget)
        runs[IMAGE_MARKER] = [image_run(p.soft_tokens, mm) for p in patches]
    if clips:
        tokens = audio_support(manifest)
        runs[AUDIO_MARKER] = [audio_run(c.soft_tokens, tokens) for c in clips]
    return patches, runs


def _image_rows(runner: Any, patches: list[Any]) -> np.ndarray | None:
    if not patches:
        return None
    from ..model.vision_preprocess import batch_patches

    return soft_token_rows(*runner.encode_images(*batch_patches(patches)))


def _audio_rows(runner: Any, clips: list[Any]) -> np.ndarray | None:
    if not clips:
        return None
    from ..model.audio_preprocess import batch_features

    return soft_token_rows(*runner.encode_audio(*batch_features(clips)))
