"""The two `gemma4` custom ops: the contract shared by the PyTorch model, the ONNX nodes and the plugins.

Letters: B batch, S new tokens, C cache slots, Hq query heads, Hkv KV heads, D head dim,
T tokens (B*S), H hidden, E experts, K top-k, I expert width.

gemma4::attention(q, k, v, past_k, past_v, past_len, seq_len, *, window, scale, block_ids=None)
    -> (out, present_k, present_v)
    q        [B, Hq,  S, D]   queries after q_norm and RoPE
    k, v     [B, Hkv, S, D]   this step's keys (k_norm + RoPE) and values (v_norm), Hq % Hkv == 0
    past_k/v [B, Hkv, C, D]   the layer's cache: a ring of C slots, position p lives in slot p mod C
    past_len [B] int64        tokens already in the cache per row; new token s sits at position past_len + s
    seq_len  [B] int64        valid new tokens per row (1..S); tokens s >= seq_len are right padding
    window   int              W > 0: a query at position i sees keys j with i - W < j <= i (W keys incl. itself);
                              0: global causal attention, j <= i
    scale    float            score multiplier (1.0 for Gemma 4: the q/k norms set the scale)
    block_ids [B, S] int64    optional (26B/31B image prompts): -1 for text/audio, k for the k-th run of image
                              tokens in this call; with W > 0 a query also sees the new keys of its own block
                              (later ones too), still inside the window: window AND (causal OR same block).
                              Ignored when W == 0 (global layers stay causal)
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

from ..ops.attention.reference import attention_mask, attention_reference, ring_update, slot_positions
from ..ops.moe.reference import expert_glu, moe_reference, route

__all__ = [
    "attention",
    "attention_mask",
    "attention_reference",
    "expert_glu",
    "moe",
    "moe_reference",
    "ring_update",
    "route",
    "slot_positions",
]  # the references live with their ops (gemma4_compile.ops.*)

# ----- attention --------------------------------------------------------------------------------


@torch.library.custom_op("gemma4::attention", mutates_args=())
def attention(
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
    return attention_reference(q, k, v, past_k, past_v, past_len, seq_len, window, scale, block_ids)


@attention.register_fake
def _(q, k, v, past_k, past_v, past_len, seq_len, window, scale, block_ids=None):
    return torch.empty_like(q), torch.empty_like(past_k), torch.empty_like(past_v)


# ----- mixture of experts -----------------------------------------------------------------------


@torch.library.custom_op("gemma4::moe", mutates_args=())
def moe(
    x: Tensor, router_logits: Tensor, per_expert_scale: Tensor, gate_up: Tensor, down: Tensor, top_k: int
) -> Tensor:
    return moe_reference(x, router_logits, per_expert_scale, gate_up, down, top_k)


@moe.register_fake
def _(x, router_logits, per_expert_scale, gate_up, down, top_k):
    return torch.empty_like(x)
