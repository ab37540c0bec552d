"""Names, dtypes and symbolic shapes of the graphs, derived once from the spec.

The same description produces the trace inputs, the dynamic shapes for torch.export, the manifest entries,
the onnxruntime feeds and (in engines/) the TensorRT optimization profiles.
"""

from __future__ import annotations

import torch
from torch.export import Dim

from ..dtypes import DType
from ..model.audio_config import MEL_BINS, AudioSpec
from ..model.config import Gemma4Spec, LayerPlan
from ..model.model import debug_output_names
from ..model.vision_config import VisionSpec
from .manifest import (
    AUDIO,
    AUDIO_EMBEDS,
    BATCH,
    CACHE_LEN,
    IMAGE_EMBEDS,
    MM_BLOCK_IDS,
    SEQUENCE,
    SLIDING_SLOTS,
    VISION,
    TensorSpec,
    cache_names,
)

__all__ = [
    "AUDIO",
    "AUDIO_EMBED_TOKENS",
    "AUDIO_TOKENS",
    "BATCH",
    "CACHE_LEN",
    "CLIPS",
    "FRAMES",
    "IMAGES",
    "IMAGE_TOKENS",
    "MM_BLOCK_IDS",
    "PATCHES",
    "SEQUENCE",
    "SLIDING_SLOTS",
    "SOFT_TOKENS",
    "VISION",
    "audio_io",
    "cache_names",
    "decoder_io",
    "embed_io",
    "vision_io",
]

# The vision graph's symbolic dims (docs/export-format.md, Vision I/O), and the embed graph's soft-token rows.
IMAGES, PATCHES, SOFT_TOKENS = "images", "patches", "soft_tokens"
# The audio graph's (docs/export-format.md, Audio I/O).
CLIPS, FRAMES, AUDIO_TOKENS = "clips", "frames", "audio_tokens"
IMAGE_TOKENS = "image_tokens"
AUDIO_EMBED_TOKENS = "audio_embed_tokens"  # the embed graph's audio rows (audio_tokens is per clip)


def cache_shape(plan: LayerPlan) -> tuple[int | str, ...]:
    return (BATCH, plan.num_kv_heads, SLIDING_SLOTS if plan.is_sliding else CACHE_LEN, plan.head_dim)


def embed_io(
    spec: Gemma4Spec, dtype: DType | str, images: bool = False, audio: bool = False
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """With `images` (a vision graph in the export) the embed graph also takes the soft tokens it merges, and
    with `audio` too (an audio graph as well) the audio ones after them."""
    act = DType.parse(dtype).onnx_name
    outputs = [TensorSpec("inputs_embeds", act, (BATCH, SEQUENCE, spec.hidden_size))]
    if spec.has_ple:
        outputs.append(
            TensorSpec(
                "per_layer_tokens",
                act,
                (BATCH, SEQUENCE, spec.num_hidden_layers, spec.hidden_size_per_layer_input),
            )
        )
    inputs = [TensorSpec("input_ids", "int64", (BATCH, SEQUENCE))]
    if images:
        inputs.append(TensorSpec(IMAGE_EMBEDS, act, (IMAGE_TOKENS, spec.hidden_size)))
    if images and audio:
        inputs.append(TensorSpec(AUDIO_EMBEDS, act, (AUDIO_EMBED_TOKENS, spec.hidden_size)))
    return inputs, outputs


def decoder_io(
    spec: Gemma4Spec, dtype: DType | str, debug: bool = False, block_ids: bool = False
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """`block_ids`: the decoder takes `mm_block_ids` [B, S] after seq_len (26B/31B exports with images:
    export.json multimodal.decoder_mask)."""
    act = DType.parse(dtype).onnx_name
    _, embed_outputs = embed_io(spec, dtype)
    inputs = [
        *embed_outputs,
        TensorSpec("past_len", "int64", (BATCH,)),
        TensorSpec("seq_len", "int64", (BATCH,)),
    ]
    if block_ids:
        inputs.append(TensorSpec(MM_BLOCK_IDS, "int64", (BATCH, SEQUENCE)))
    outputs = [TensorSpec("logits", "float32", (BATCH, SEQUENCE, spec.vocab_size))]
    for plan in spec.cache_layers:
        past, present = cache_names(plan)
        inputs += [TensorSpec(n, act, cache_shape(plan)) for n in past]
        outputs += [TensorSpec(n, act, cache_shape(plan)) for n in present]
    if debug:
        for name in debug_output_names(spec):
            width = spec.num_experts if name.startswith("router") else spec.hidden_size
            outputs.append(TensorSpec(name, act, (BATCH, SEQUENCE, width)))
    return inputs, outputs


def vision_io(spec: VisionSpec, dtype: DType | str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Patches in the processor's layout -> padded soft tokens in the text width, and how many are real."""
    act = DType.parse(dtype).onnx_name
    inputs = [
        TensorSpec("pixel_values", act, (IMAGES, PATCHES, spec.patch_dim)),
        TensorSpec("image_position_ids", "int64", (IMAGES, PATCHES, 2)),
    ]
    outputs = [
        TensorSpec("image_soft_tokens", act, (IMAGES, SOFT_TOKENS, spec.text_hidden_size)),
        TensorSpec("image_soft_len", "int64", (IMAGES,)),
    ]
    return inputs, outputs


def audio_io(spec: AudioSpec, dtype: DType | str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The feature extractor's log-mel frames and mask -> padded soft tokens in the text width, and how many
    are real."""
    act = DType.parse(dtype).onnx_name
    inputs = [
        TensorSpec("input_features", act, (CLIPS, FRAMES, MEL_BINS)),
        TensorSpec("input_features_mask", "bool", (CLIPS, FRAMES)),
    ]
    outputs = [
        TensorSpec("audio_soft_tokens", act, (CLIPS, AUDIO_TOKENS, spec.text_hidden_size)),
        TensorSpec("audio_soft_len", "int64", (CLIPS,)),
    ]
    return inputs, outputs


# ----- tracing -----------------------------------------------------------------------------------

# Example sizes: all distinct and > 1, so torch.export neither specializes nor unifies the dims.
# The vision graph derives soft_tokens = patches / 9 itself, the audio graph audio_tokens from frames; only
# the inputs' dims are traced as dynamic. 53 frames: an odd count, two attention blocks after subsampling.
_EXAMPLE = {
    BATCH: 2,
    SEQUENCE: 3,
    SLIDING_SLOTS: 5,
    CACHE_LEN: 7,
    IMAGES: 4,
    PATCHES: 27,
    CLIPS: 6,
    FRAMES: 53,
    IMAGE_TOKENS: 8,
    AUDIO_EMBED_TOKENS: 9,
}


def example_tensor(t: TensorSpec, device: str = "meta") -> torch.Tensor:
    shape = [_EXAMPLE[d] if isinstance(d, str) else d for d in t.shape]
    return torch.zeros(shape, dtype=DType.parse(t.dtype).torch, device=device)


def dynamic_shapes(specs: list[TensorSpec]) -> list[dict[int, Dim]]:
    dims = {name: Dim(name) for name in _EXAMPLE}
    return [{i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in specs]
