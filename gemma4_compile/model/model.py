"""Gemma 4 text decoder in plain PyTorch, written against docs/architecture.md.

Letters: B batch, S new tokens, C cache slots, H hidden, L layers, P per-layer-input width (PLE),
Hq/Hkv query/KV heads, D head dim, V vocab.

Module and parameter names are the checkpoint's (`layers.3.self_attn.q_proj.weight` ...), so weights load
by name. Caches are explicit tensors passed in and returned: one (key, value) pair per cache-owning layer,
shaped [B, Hkv, C, D] with C == W on sliding layers (a ring) and C >= the longest sequence on global layers.
KV-shared consumer layers own no cache; they attend over their producer's K/V.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..export.manifest import cache_spec
from . import ops
from .config import Gemma4Spec, LayerPlan

Cache = list[tuple[Tensor, Tensor]]


class RMSNorm(nn.Module):
    """Gemma 4 RMSNorm: y = x * (mean(x^2) + eps)^-0.5 * w, in fp32 or wider (the fp64 drift-gate run stays
    fp64); the weight is used as is (not 1 + w)."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(at_least_fp32(x.dtype))
        h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            h = h * self.weight.to(h.dtype)
        return h.to(x.dtype)


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """Where the model upcasts half precision: to fp32, but never down from fp64."""
    return torch.promote_types(dtype, torch.float32)


def rope_inv_freq(plan: LayerPlan) -> Tensor:
    """[D/2] inverse frequencies; proportional RoPE divides by the full head dim and zeroes the nope pairs."""
    rotating = torch.arange(0, plan.rope_rotary_dims, 2, dtype=torch.int64).float()
    inv = 1.0 / (plan.rope_theta ** (rotating / plan.head_dim))
    return torch.cat([inv, torch.zeros(plan.head_dim // 2 - inv.numel())])


def rope_tables(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, S, D] for rotate-half RoPE, computed in fp32 (or wider) and cast to the activation dtype."""
    compute = at_least_fp32(dtype)
    freqs = positions[..., None].to(compute) * inv_freq.to(compute)  # [B, S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, S, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2  # slices, not chunk(): chunk exports as ONNX sequence ops TensorRT cannot import
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVState(NamedTuple):
    """What a KV-shared consumer needs from its producer: this step's K/V and the producer's cache."""

    k: Tensor  # [B, Hkv, S, D]
    v: Tensor
    past_k: Tensor  # [B, Hkv, C, D]
    past_v: Tensor


class Attention(nn.Module):
    def __init__(self, spec: Gemma4Spec, plan: LayerPlan):
        super().__init__()
        self.plan = plan
        H, Hq, D, Hkv = spec.hidden_size, spec.num_attention_heads, plan.head_dim, plan.num_kv_heads
        self.q_proj = nn.Linear(H, Hq * D, bias=False)
        self.q_norm = RMSNorm(D, spec.rms_norm_eps)
        if plan.owns_cache:
            self.k_proj = nn.Linear(H, Hkv * D, bias=False)
            self.v_proj = nn.Linear(H, Hkv * D, bias=False) if plan.has_v_proj else None
            self.k_norm = RMSNorm(D, spec.rms_norm_eps)
            self.v_norm = RMSNorm(D, spec.rms_norm_eps, with_scale=False)
        self.o_proj = nn.Linear(Hq * D, H, bias=False)

    def _heads(self, x: Tensor) -> Tensor:  # [B, S, n*D] -> [B, S, n, D]
        return x.unflatten(-1, (-1, self.plan.head_dim))

    def project_kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        raw_k = self._heads(self.k_proj(x))  # [B, S, Hkv, D]
        raw_v = self._heads(self.v_proj(x)) if self.v_proj is not None else raw_k  # K=V: same projection
        k = apply_rope(self.k_norm(raw_k).transpose(1, 2), cos, sin)  # [B, Hkv, S, D]
        v = self.v_norm(raw_v).transpose(1, 2)
        return k, v

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        past_len: Tensor,
        seq_len: Tensor,
        cache: tuple[Tensor, Tensor] | None,
        shared: KVState | None,
        block_ids: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None, KVState]:
        q = apply_rope(self.q_norm(self._heads(self.q_proj(x))).transpose(1, 2), cos, sin)  # [B, Hq, S, D]
        if shared is None:
            assert cache is not None
            k, v = self.project_kv(x, cos, sin)
            shared = KVState(k, v, cache[0], cache[1])
        out, present_k, present_v = ops.attention(
            q,
            shared.k,
            shared.v,
            shared.past_k,
            shared.past_v,
            past_len,
            seq_len,
            self.plan.window,
            1.0,
            block_ids,
        )
        out = self.o_proj(out.transpose(1, 2).flatten(2))  # [B, S, H]
        present = (present_k, present_v) if self.plan.owns_cache else None
        return out, present, shared


class MLP(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Router(nn.Module):
    """Router logits: proj(rms_norm(x) * scale * H^-0.5); softmax/top-k live in the gemma4::moe op."""

    def __init__(self, spec: Gemma4Spec):
        super().__init__()
        H, E = spec.hidden_size, spec.num_experts
        self.norm = RMSNorm(H, spec.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(H, E, bias=False)
        self.scale = nn.Parameter(torch.ones(H))
        self.per_expert_scale = nn.Parameter(torch.ones(E))
        self.root_size = H**-0.5

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x) * self.scale * self.root_size)


class Experts(nn.Module):
    def __init__(self, spec: Gemma4Spec):
        super().__init__()
        E, H, I = spec.num_experts, spec.hidden_size, spec.moe_intermediate_size  # noqa: E741
        self.top_k = spec.top_k_experts
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x: Tensor, router_logits: Tensor, per_expert_scale: Tensor) -> Tensor:
        return ops.moe(x, router_logits, per_expert_scale, self.gate_up_proj, self.down_proj, self.top_k)


class DecoderLayer(nn.Module):
    def __init__(self, spec: Gemma4Spec, plan: LayerPlan):
        super().__init__()
        H, eps = spec.hidden_size, spec.rms_norm_eps
        self.plan = plan
        self.self_attn = Attention(spec, plan)
        self.mlp = MLP(H, plan.mlp_width)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.post_feedforward_layernorm = RMSNorm(H, eps)
        self.register_buffer("layer_scalar", torch.ones(1))
        if plan.moe:
            self.router = Router(spec)
            self.experts = Experts(spec)
            self.pre_feedforward_layernorm_2 = RMSNorm(H, eps)
            self.post_feedforward_layernorm_1 = RMSNorm(H, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(H, eps)
        if spec.has_ple:
            P = spec.hidden_size_per_layer_input
            self.per_layer_input_gate = nn.Linear(H, P, bias=False)
            self.per_layer_projection = nn.Linear(P, H, bias=False)
            self.post_per_layer_input_norm = RMSNorm(H, eps)

    def feed_forward(self, h: Tensor) -> tuple[Tensor, Tensor | None]:
        """-> FFN branch output and (MoE layers) the router logits [B*S, E]."""
        f = self.mlp(self.pre_feedforward_layernorm(h))
        logits = None
        if self.plan.moe:
            flat = h.flatten(0, 1)  # [B*S, H]: router and experts read the residual, not the pre-FFN norm
            logits = self.router(flat)
            e = self.experts(self.pre_feedforward_layernorm_2(flat), logits, self.router.per_expert_scale)
            f = self.post_feedforward_layernorm_1(f) + self.post_feedforward_layernorm_2(e.view_as(h))
        return self.post_feedforward_layernorm(f), logits

    def forward(
        self,
        h: Tensor,
        ple: Tensor | None,
        cos: Tensor,
        sin: Tensor,
        past_len: Tensor,
        seq_len: Tensor,
        cache: tuple[Tensor, Tensor] | None,
        shared: KVState | None,
        block_ids: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None, KVState, Tensor | None]:
        x = self.input_layernorm(h)
        a, present, kv = self.self_attn(x, cos, sin, past_len, seq_len, cache, shared, block_ids)
        h = h + self.post_attention_layernorm(a)
        f, router_logits = self.feed_forward(h)
        h = h + f
        if ple is not None:
            g = F.gelu(self.per_layer_input_gate(h), approximate="tanh") * ple
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return (h * self.layer_scalar).to(h.dtype), present, kv, router_logits


class Gemma4TextModel(nn.Module):
    """The text decoder. `embed` maps ids to inputs; `forward` runs the layers on explicit caches."""

    def __init__(self, spec: Gemma4Spec):
        super().__init__()
        self.spec = spec
        H, V, L = spec.hidden_size, spec.vocab_size, spec.num_hidden_layers
        self.embed_tokens = nn.Embedding(V, H)
        if spec.has_ple:
            P = spec.hidden_size_per_layer_input
            self.embed_tokens_per_layer = nn.Embedding(spec.vocab_size_per_layer_input, L * P)
            self.per_layer_model_projection = nn.Linear(H, L * P, bias=False)
            self.per_layer_projection_norm = RMSNorm(P, spec.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(spec, plan) for plan in spec.layers)
        self.norm = RMSNorm(H, spec.rms_norm_eps)
        self.reset_rope_buffers()

    def rope_buffers(self) -> dict[str, Tensor]:
        """fp32 inverse frequencies per layer kind (not in the checkpoint; computed from the spec)."""
        plans = {p.kind: p for p in reversed(self.spec.layers)}
        return {f"inv_freq_{kind}": rope_inv_freq(plan) for kind, plan in plans.items()}

    def reset_rope_buffers(self) -> None:
        """(Re)create the RoPE buffers in fp32 on the model's device: they must not follow `.to(bf16)`."""
        device = self.norm.weight.device
        for name, value in self.rope_buffers().items():
            self.register_buffer(name, value.to(device), persistent=False)

    # ----- embedding stage (kept outside the decoder graph: the big tables never enter it) -------
    def embed(self, input_ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """ids [B, S] -> inputs_embeds [B, S, H] and PLE token embeddings [B, S, L, P] (None without PLE)."""
        w = self.embed_tokens.weight
        inputs_embeds = F.embedding(input_ids, w) * torch.tensor(self.spec.embed_scale()).to(w.dtype)
        if not self.spec.has_ple:
            return inputs_embeds, None
        wp = self.embed_tokens_per_layer.weight
        P = self.spec.hidden_size_per_layer_input
        tok = F.embedding(input_ids, wp) * torch.tensor(math.sqrt(P)).to(wp.dtype)
        return inputs_embeds, tok.unflatten(-1, (self.spec.num_hidden_layers, P))

    def per_layer_inputs(self, inputs_embeds: Tensor, tok: Tensor) -> Tensor:
        """PLE: (rms_norm(proj(x) * H^-0.5) + token identity) * 2^-0.5, [B, S, L, P]."""
        spec = self.spec
        ctx = self.per_layer_model_projection(inputs_embeds) * spec.hidden_size**-0.5
        ctx = self.per_layer_projection_norm(ctx.unflatten(-1, (spec.num_hidden_layers, -1)))
        return (ctx + tok) * 2.0**-0.5

    # ----- decoder ------------------------------------------------------------------------------
    def forward(
        self,
        inputs_embeds: Tensor,
        per_layer_tokens: Tensor | None,
        past_len: Tensor,
        seq_len: Tensor,
        caches: Cache,
        debug: bool = False,
        block_ids: Tensor | None = None,
    ) -> tuple[Tensor, Cache, list[Tensor]]:
        """-> logits [B, S, V] (fp32, soft-capped), updated caches, and with `debug` the per-layer tensors
        (see `debug_output_names`): the residual after each layer, followed by MoE layers' router logits.

        `block_ids` [B, S] int64 (26B/31B image prompts: vision_config.bidirectional_image_blocks): -1 for text and
        audio, k for the k-th run of image tokens in this call; sliding layers let each run attend both ways
        inside itself, global layers ignore it. Every attention node gets it, so an export has one body."""
        h = inputs_embeds
        ple = self.per_layer_inputs(h, per_layer_tokens) if self.spec.has_ple else None
        positions = past_len[:, None] + torch.arange(h.shape[1], device=h.device)  # [B, S]
        rope = {
            kind: rope_tables(positions, getattr(self, f"inv_freq_{kind}"), h.dtype)
            for kind in ("sliding", "global")
            if hasattr(self, f"inv_freq_{kind}")
        }
        presents: Cache = []
        shared: dict[int, KVState] = {}
        hidden: list[Tensor] = []
        routers: list[Tensor] = []
        for layer in self.layers:
            plan = layer.plan
            cos, sin = rope[plan.kind]
            cache = caches[plan.cache_index] if plan.owns_cache else None
            layer_ple = ple[:, :, plan.index] if ple is not None else None
            h, present, kv, router_logits = layer(
                h, layer_ple, cos, sin, past_len, seq_len, cache, shared.get(plan.kv_producer), block_ids
            )
            if present is not None:
                presents.append(present)
                shared[plan.index] = kv
            if debug:
                hidden.append(h)
                if router_logits is not None:
                    routers.append(router_logits.unflatten(0, h.shape[:2]))
        return self.logits(self.norm(h)), presents, hidden + routers

    def logits(self, h: Tensor) -> Tensor:
        """Tied head and final soft-cap, in fp32."""
        logits = F.linear(h, self.embed_tokens.weight).float()
        cap = self.spec.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    # ----- cache helpers --------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> Cache:
        """Zeroed caches: W slots on sliding layers, `max_len` slots on global layers."""
        dtype = dtype or self.embed_tokens.weight.dtype
        device = self.embed_tokens.weight.device
        return [
            tuple(
                torch.zeros(cache_spec(self.spec, p).shape(batch, max_len), dtype=dtype, device=device)
                for _ in range(2)
            )
            for p in self.spec.cache_layers
        ]


def debug_output_names(spec: Gemma4Spec) -> list[str]:
    """Names of the extra tensors `Gemma4TextModel.forward(debug=True)` returns, in order."""
    names = [f"hidden_states.{p.index}" for p in spec.layers]
    return names + [f"router_logits.{p.index}" for p in spec.layers if p.moe]
