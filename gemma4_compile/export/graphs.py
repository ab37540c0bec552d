"""The traced graphs as thin modules over `Gemma4TextModel`, `Gemma4Vision` and `Gemma4Audio` with flat tensor I/O
in io_spec order.

All take `*flat` so one tracing routine serves all (dynamic shapes are given for the varargs tuple).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..model.audio import Gemma4Audio
from ..model.model import Gemma4TextModel
from ..model.vision import Gemma4Vision


class EmbedGraph(nn.Module):
    """input_ids -> inputs_embeds (+ per_layer_tokens): the big tables stay out of the decoder.

    With `image_token_id` (exports with a vision graph) it also takes `image_embeds` [N, E], the images' real
    soft tokens in prompt order, and merges them (docs/export-format.md, Multimodal): placeholders become pad
    for both lookups, then the j-th placeholder row (row-major over the batch) is overwritten by row j, unscaled.
    With `audio_token_id` too, `audio_embeds` [M, E] follows and is merged at the audio placeholders the same way.
    Static shapes only (cumsum, gather, where); one zero row is appended in the graph so N = 0 (a text-only
    call) still gathers in range, and a placeholder past the N-th reads it (the host checks the counts)."""

    def __init__(
        self, model: Gemma4TextModel, image_token_id: int | None = None, audio_token_id: int | None = None
    ):
        super().__init__()
        self.model = model
        # placeholder ids in the order of their soft-token inputs
        self.token_ids = [t for t in (image_token_id, audio_token_id) if t is not None]

    def forward(self, *flat: Tensor) -> tuple[Tensor, ...]:
        ids = flat[0]
        if not self.token_ids:
            embeds, tok = self.model.embed(ids)
            return (embeds,) if tok is None else (embeds, tok)
        masks = [ids == t for t in self.token_ids]
        placeholder = torch.stack(masks).any(0)
        embeds, tok = self.model.embed(torch.where(placeholder, self.model.spec.pad_token_id, ids))
        for mask, soft in zip(masks, flat[1:]):
            embeds = _overwrite(embeds, mask, soft)
        return (embeds,) if tok is None else (embeds, tok)


def _overwrite(embeds: Tensor, mask: Tensor, soft: Tensor) -> Tensor:
    """`embeds` [B, S, E] with its j-th `mask` row (row-major) replaced by `soft` row j."""
    rows = torch.cat([soft, soft.new_zeros(1, soft.shape[1])])  # [N + 1, E]
    j = mask.flatten().cumsum(0).view_as(mask) - 1  # index of each placeholder among all of them
    taken = rows[torch.minimum(j.clamp(min=0), torch.full_like(j, rows.shape[0] - 1))]
    return torch.where(mask[..., None], taken.to(embeds.dtype), embeds)


class DecoderGraph(nn.Module):
    """(inputs_embeds, [per_layer_tokens], past_len, seq_len, [mm_block_ids], past k/v ...) -> (logits,
    present k/v ..., [debug]). `block_ids`: 26B/31B exports with images take `mm_block_ids` [B, S] (io_spec)."""

    def __init__(self, model: Gemma4TextModel, debug: bool = False, block_ids: bool = False):
        super().__init__()
        self.model = model
        self.debug = debug
        self.block_ids = block_ids

    def forward(self, *flat: Tensor) -> tuple[Tensor, ...]:
        has_ple = self.model.spec.has_ple
        inputs_embeds, per_layer_tokens = flat[0], flat[1] if has_ple else None
        past_len, seq_len, *rest = flat[2:] if has_ple else flat[1:]
        block_ids, cache_flat = (rest[0], rest[1:]) if self.block_ids else (None, rest)
        caches = [(cache_flat[i], cache_flat[i + 1]) for i in range(0, len(cache_flat), 2)]
        logits, presents, extra = self.model(
            inputs_embeds, per_layer_tokens, past_len, seq_len, caches, self.debug, block_ids
        )
        return (logits, *[t for kv in presents for t in kv], *extra)


class VisionGraph(nn.Module):
    """(pixel_values, image_position_ids) -> (image_soft_tokens, image_soft_len).

    The real soft tokens of image i are rows [0, image_soft_len[i]) (for well-formed position grids the
    valid pooling bins are a prefix); the rows after them are zero, like right padding after `seq_len`."""

    def __init__(self, model: Gemma4Vision):
        super().__init__()
        self.model = model

    def forward(self, *flat: Tensor) -> tuple[Tensor, Tensor]:
        soft, valid = self.model(flat[0], flat[1])
        return soft, valid.sum(dim=-1)


class AudioGraph(nn.Module):
    """(input_features, input_features_mask) -> (audio_soft_tokens, audio_soft_len).

    The real soft tokens of clip i are rows [0, audio_soft_len[i]) for a right-padded mask (as the feature
    extractor makes it); the rows after them are zero."""

    def __init__(self, model: Gemma4Audio):
        super().__init__()
        self.model = model

    def forward(self, *flat: Tensor) -> tuple[Tensor, Tensor]:
        soft, valid = self.model(flat[0], flat[1])
        return soft, valid.sum(dim=-1)
