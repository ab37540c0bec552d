"""The torch reference of `gemma4::SlidingWindowAttention` (semantics: gemma4_compile.model.ops), on CPU or GPU."""

from __future__ import annotations

import torch
from torch import Tensor


def slot_positions(length: Tensor, slots: int) -> Tensor:
    """[B] tokens written so far -> [B, slots] position held by each ring slot (negative: empty)."""
    last = length[:, None] - 1
    j = torch.arange(slots, device=length.device, dtype=length.dtype)
    return last - torch.remainder(last - j, slots)


def attention_mask(
    past_len: Tensor,
    seq_len: Tensor,
    slots: int,
    new: int,
    window: int,
    block_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Visibility [B, S, C+S] of (cached slots ++ new tokens) for each new query, and query positions [B, S].

    `block_ids` [B, S] (sliding layers only): a new key is also visible to a new query of the same block
    (>= 0), later ones included, still inside the window; cached keys are all in the past, so only the new
    ones need ids."""
    s = torch.arange(new, device=past_len.device, dtype=past_len.dtype)
    q_pos = past_len[:, None] + s  # [B, S]
    slot_pos = slot_positions(past_len, slots)  # [B, C]
    k_pos = torch.cat([slot_pos, q_pos], dim=1)  # [B, C+S]
    k_valid = torch.cat([slot_pos >= 0, s[None, :] < seq_len[:, None]], dim=1)
    visible = k_pos[:, None, :] <= q_pos[:, :, None]
    if window > 0 and block_ids is not None:
        same = (block_ids[:, :, None] == block_ids[:, None, :]) & (block_ids[:, :, None] >= 0)  # [B, S, S]
        visible = visible | torch.cat([torch.zeros_like(visible[:, :, :slots]), same], dim=2)
    visible = visible & k_valid[:, None, :]
    if window > 0:
        visible = visible & (k_pos[:, None, :] > q_pos[:, :, None] - window)
    return visible, q_pos


def ring_update(past: Tensor, new: Tensor, past_len: Tensor, seq_len: Tensor) -> Tensor:
    """Write the valid new tokens [B, Hkv, S, D] into the ring [B, Hkv, C, D]; returns a new tensor."""
    B, Hkv, C, D = past.shape
    S = new.shape[2]
    slot_pos = slot_positions(past_len + seq_len, C)  # [B, C] position each slot holds afterwards
    take_new = slot_pos >= past_len[:, None]
    src = (slot_pos - past_len[:, None]).clamp(0, S - 1)
    gathered = torch.gather(new, 2, src[:, None, :, None].expand(B, Hkv, C, D))
    return torch.where(take_new[:, None, :, None], gathered, past)


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    past_k: Tensor,
    past_v: Tensor,
    past_len: Tensor,
    seq_len: Tensor,
    window: int,
    scale: float,
    block_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    B, Hq, S, D = q.shape
    Hkv, C = k.shape[1], past_k.shape[2]
    G = Hq // Hkv
    visible, _ = attention_mask(past_len, seq_len, C, S, window, block_ids)  # [B, S, C+S]
    keys = torch.cat([past_k, k], dim=2)[:, :, None]  # [B, Hkv, 1, C+S, D]
    values = torch.cat([past_v, v], dim=2)[:, :, None]
    qg = q.reshape(B, Hkv, G, S, D)
    scores = torch.matmul(qg, keys.transpose(-1, -2)) * scale  # [B, Hkv, G, S, C+S], input dtype
    scores = scores.float().masked_fill(~visible[:, None, None], torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, values).reshape(B, Hq, S, D)
    return out, ring_update(past_k, k, past_len, seq_len), ring_update(past_v, v, past_len, seq_len)
