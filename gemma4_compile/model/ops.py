"""The two `gemma4` custom ops: the contract shared by the PyTorch model, the ONNX nodes and the plugins.

Letters: B batch, S new tokens, C cache slots, Hq query heads, Hkv KV heads, D head dim,
T tokens (B*S), H hidden, E experts, K top-k, I expert width.

gemma4::attention(q, k, v, past_k, past_v, past_len, seq_len, *, window, scale) -> (out, present_k, present_v)
    q        [B, Hq,  S, D]   queries after q_norm and RoPE
    k, v     [B, Hkv, S, D]   this step's keys (k_norm + RoPE) and values (v_norm), Hq % Hkv == 0
    past_k/v [B, Hkv, C, D]   the layer's cache: a ring of C slots, position p lives in slot p mod C
    past_len [B] int64        tokens already in the cache per row; new token s sits at position past_len + s
    seq_len  [B] int64        valid new tokens per row (1..S); tokens s >= seq_len are right padding
    window   int              W > 0: a query at position i sees keys j with i - W < j <= i (W keys incl. itself);
                              0: global causal attention, j <= i
    scale    float            score multiplier (1.0 for Gemma 4: the q/k norms set the scale)
    out      [B, Hq, S, D]    softmax(q k^T * scale + mask) v, softmax in fp32; GQA head h reads KV head h // (Hq/Hkv)
    present  [B, Hkv, C, D]   the ring after writing the valid new tokens (the last C of them win)

    Sliding layers use C == W (exactly W slots); global layers use C >= the longest sequence, which makes
    the ring a plain buffer with slot == position. Keys are the C cached slots followed by the S new tokens,
    each tagged with its absolute position, so one mask rule covers prefill, decode, padding and wrap-around.
    KV-shared consumer layers call the op with their producer's k/v/past and ignore the presents.

gemma4::moe(x, router_logits, per_expert_scale, gate_up, down, *, top_k) -> y
    x                [T, H]      expert input (pre_feedforward_layernorm_2 of the residual)
    router_logits    [T, E]      router.proj(rms_norm(residual) * router.scale * H^-0.5)
    per_expert_scale [E]
    gate_up          [E, 2I, H]  rows [0, I) gate, [I, 2I) up
    down             [E, H, I]
    routing: p = softmax(router_logits) in fp32 over all E; (w, idx) = top_k(p); w /= sum(w);
             w *= per_expert_scale[idx]
    y[t] = sum_k w[t,k] * down[idx] @ (gelu_tanh(gate[idx] @ x[t]) * (up[idx] @ x[t]))
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

# ----- attention --------------------------------------------------------------------------------


def slot_positions(length: Tensor, slots: int) -> Tensor:
    """[B] tokens written so far -> [B, slots] position held by each ring slot (negative: empty)."""
    last = length[:, None] - 1
    j = torch.arange(slots, device=length.device, dtype=length.dtype)
    return last - torch.remainder(last - j, slots)


def attention_mask(
    past_len: Tensor, seq_len: Tensor, slots: int, new: int, window: int
) -> tuple[Tensor, Tensor]:
    """Visibility [B, S, C+S] of (cached slots ++ new tokens) for each new query, and query positions [B, S]."""
    s = torch.arange(new, device=past_len.device, dtype=past_len.dtype)
    q_pos = past_len[:, None] + s  # [B, S]
    slot_pos = slot_positions(past_len, slots)  # [B, C]
    k_pos = torch.cat([slot_pos, q_pos], dim=1)  # [B, C+S]
    k_valid = torch.cat([slot_pos >= 0, s[None, :] < seq_len[:, None]], dim=1)
    visible = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
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
    q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor,
    past_len: Tensor, seq_len: Tensor, window: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    B, Hq, S, D = q.shape
    Hkv, C = k.shape[1], past_k.shape[2]
    G = Hq // Hkv
    visible, _ = attention_mask(past_len, seq_len, C, S, window)  # [B, S, C+S]
    keys = torch.cat([past_k, k], dim=2)[:, :, None]  # [B, Hkv, 1, C+S, D]
    values = torch.cat([past_v, v], dim=2)[:, :, None]
    qg = q.reshape(B, Hkv, G, S, D)
    scores = torch.matmul(qg, keys.transpose(-1, -2)) * scale  # [B, Hkv, G, S, C+S], input dtype
    scores = scores.float().masked_fill(~visible[:, None, None], torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, values).reshape(B, Hq, S, D)
    return out, ring_update(past_k, k, past_len, seq_len), ring_update(past_v, v, past_len, seq_len)


@torch.library.custom_op("gemma4::attention", mutates_args=())
def attention(
    q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor,
    past_len: Tensor, seq_len: Tensor, window: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return attention_reference(q, k, v, past_k, past_v, past_len, seq_len, window, scale)


@attention.register_fake
def _(q, k, v, past_k, past_v, past_len, seq_len, window, scale):
    return torch.empty_like(q), torch.empty_like(past_k), torch.empty_like(past_v)


# ----- mixture of experts -----------------------------------------------------------------------


def route(router_logits: Tensor, per_expert_scale: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Routing weights [T, K] (fp32) and expert ids [T, K]: softmax over all experts, top-k, renormalize, scale."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, index = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * per_expert_scale[index].float(), index


def expert_glu(x: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """One expert on its tokens: down(gelu_tanh(gate x) * up x); gate_up [2I, H], down [H, I]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.gelu(gate, approximate="tanh") * up, down)


def moe_reference(
    x: Tensor, router_logits: Tensor, per_expert_scale: Tensor, gate_up: Tensor, down: Tensor, top_k: int
) -> Tensor:
    weights, index = route(router_logits, per_expert_scale, top_k)
    y = torch.zeros_like(x)
    # Loop over the experts that are hit, accumulating in expert order as transformers does (bf16 parity).
    for e in torch.unique(index).tolist():
        token, slot = torch.where(index == e)
        h = expert_glu(x[token], gate_up[e], down[e]) * weights[token, slot, None]
        y.index_add_(0, token, h.to(y.dtype))
    return y


@torch.library.custom_op("gemma4::moe", mutates_args=())
def moe(
    x: Tensor, router_logits: Tensor, per_expert_scale: Tensor, gate_up: Tensor, down: Tensor, top_k: int
) -> Tensor:
    return moe_reference(x, router_logits, per_expert_scale, gate_up, down, top_k)


@moe.register_fake
def _(x, router_logits, per_expert_scale, gate_up, down, top_k):
    return torch.empty_like(x)
