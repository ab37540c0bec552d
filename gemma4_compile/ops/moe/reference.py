"""The torch reference of `gemma4::MoE` (semantics: gemma4_compile.model.ops), on CPU or GPU."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


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
