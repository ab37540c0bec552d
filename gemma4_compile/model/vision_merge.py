"""Image soft tokens into the text decoder's inputs (docs/architecture.md, vision: merge).

The prompt holds one image placeholder id per soft token. Placeholders become the pad id before *both*
embedding lookups (the scaled token embedding and the PLE token identity); then the placeholder rows of
`inputs_embeds` are overwritten, in prompt order (row-major over the batch), by the images' real soft tokens,
unscaled. The PLE context projection then sees the merged rows, as the decoder computes it from them.

Written with static shapes only (cumsum, compare, gather, where), so it can move into the embed graph as is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import Gemma4CompileError

IMAGE_TOKEN_ID = 258_880  # `image_token_id` of every released Gemma 4 config


def placeholders_to_pad(input_ids: Tensor, pad_token_id: int, image_token_id: int = IMAGE_TOKEN_ID) -> Tensor:
    """The ids both embedding lookups see: image placeholders replaced by the pad id."""
    return torch.where(input_ids == image_token_id, pad_token_id, input_ids)


def merge_image_soft_tokens(
    inputs_embeds: Tensor,
    input_ids: Tensor,
    soft_tokens: Tensor,
    soft_len: Tensor,
    image_token_id: int = IMAGE_TOKEN_ID,
) -> Tensor:
    """inputs_embeds [B, S, E] with each placeholder row replaced by the next real soft token.

    soft_tokens [N, T, E] and soft_len [N] are the vision graph's outputs: image i's soft tokens are
    soft_tokens[i, :soft_len[i]], and the images are consumed in order."""
    is_image = input_ids == image_token_id  # [B, S]
    wanted, given = int(is_image.sum()), int(soft_len.sum())
    if wanted != given:
        raise Gemma4CompileError(
            f"the prompt has {wanted} image placeholders but the images give {given} soft tokens"
        )
    if given == 0:
        return inputs_embeds
    j = is_image.flatten().cumsum(0).view_as(input_ids) - 1  # [B, S] index of this placeholder among all
    ends = soft_len.cumsum(0)  # [N] one past each image's last soft token, in that running index
    image = (j[..., None] >= ends).sum(-1).clamp(max=len(soft_len) - 1)  # [B, S] the image the j-th one reads
    row = (j - (ends - soft_len)[image]).clamp(min=0)  # [B, S] its row within that image
    taken = soft_tokens[image, row]  # [B, S, E]
    return torch.where(is_image[..., None], taken.to(inputs_embeds.dtype), inputs_embeds)
