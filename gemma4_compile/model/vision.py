"""Gemma 4 vision tower and its projector in plain PyTorch, written against docs/architecture.md (vision).

Letters: N images, P patches per image (padded; a multiple of k^2), T = P / k^2 soft tokens, k pooling kernel,
D vision width, E text width, A attention heads, Dh head dim.

Input is the Hugging Face processor's patch layout: `pixel_values` [N, P, 3*p*p] in [0, 1] and
`positions` [N, P, 2] holding (x = column, y = row) per patch, (-1, -1) for padding. Output is padded and
static in shape: soft tokens [N, T, E] and a validity mask [N, T] (transformers instead drops the empty bins,
a data-dependent shape no exported graph can have). Module and parameter names are the checkpoint's
(`vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight`, ...), so weights load by name.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import Gemma4CompileError
from .model import RMSNorm, apply_rope
from .vision_config import VisionSpec

CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")


class ClippableLinear(nn.Module):
    """A bias-free linear; with `clip`, input and output are clamped to bounds stored in the checkpoint."""

    def __init__(self, d_in: int, d_out: int, clip: bool):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=False)
        self.clip = clip
        if clip:  # scalars: +-inf in a fresh model, real bounds in released E2B/E4B weights
            for name in CLIP_BOUNDS:
                self.register_buffer(name, torch.tensor(math.inf if name.endswith("max") else -math.inf))

    def forward(self, x: Tensor) -> Tensor:
        if not self.clip:
            return self.linear(x)
        y = self.linear(torch.clamp(x, self.input_min, self.input_max))
        return torch.clamp(y, self.output_min, self.output_max)


def axial_rope_tables(
    positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos, sin [N, P, 1, Dh]: the first half of each head rotates by the column x, the second by the row y.

    Each half uses Dh/4 frequencies theta^(-j / (Dh/4)), j < Dh/4, laid out for rotate-half. Angles are fp32."""
    quarter = head_dim // 4
    inv_freq = theta ** (-torch.arange(quarter, device=positions.device, dtype=torch.float32) / quarter)
    angles = positions[..., None].float() * inv_freq  # [N, P, 2, Dh/4]
    x, y = angles[:, :, 0], angles[:, :, 1]
    emb = torch.cat([x, x, y, y], dim=-1)[:, :, None]  # [N, P, 1, Dh]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_axial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [N, P, A, Dh]: rotate-half RoPE on each half of the head, with that half's angles."""
    h = x.shape[-1] // 2  # slices, not split(): split exports as sequence ops TensorRT cannot import
    return torch.cat(
        [
            apply_rope(x[..., :h], cos[..., :h], sin[..., :h]),
            apply_rope(x[..., h:], cos[..., h:], sin[..., h:]),
        ],
        dim=-1,
    )


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention, scale 1.0, q/k RMSNorm (scaled) and v RMSNorm (unscaled) before RoPE."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        D, A, Dh, clip = spec.hidden_size, spec.num_attention_heads, spec.head_dim, spec.use_clipped_linears
        self.head_dim = Dh
        self.q_proj = ClippableLinear(D, A * Dh, clip)
        self.k_proj = ClippableLinear(D, A * Dh, clip)
        self.v_proj = ClippableLinear(D, A * Dh, clip)
        self.o_proj = ClippableLinear(A * Dh, D, clip)
        self.q_norm = RMSNorm(Dh, spec.rms_norm_eps)
        self.k_norm = RMSNorm(Dh, spec.rms_norm_eps)
        self.v_norm = RMSNorm(Dh, spec.rms_norm_eps, with_scale=False)

    def _heads(self, x: Tensor) -> Tensor:  # [N, P, A*Dh] -> [N, P, A, Dh]
        return x.unflatten(-1, (-1, self.head_dim))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_bias: Tensor) -> Tensor:
        q = apply_axial_rope(self.q_norm(self._heads(self.q_proj(x))), cos, sin).transpose(
            1, 2
        )  # [N, A, P, Dh]
        k = apply_axial_rope(self.k_norm(self._heads(self.k_proj(x))), cos, sin).transpose(1, 2)
        v = self.v_norm(self._heads(self.v_proj(x))).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)).float() + key_bias  # [N, A, P, P]; padding keys get -inf-like bias
        out = torch.softmax(scores, dim=-1).to(v.dtype) @ v  # [N, A, P, Dh]
        return self.o_proj(out.transpose(1, 2).flatten(2))  # [N, P, D]


class VisionMLP(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        D, I, clip = spec.hidden_size, spec.intermediate_size, spec.use_clipped_linears  # noqa: E741
        self.gate_proj = ClippableLinear(D, I, clip)
        self.up_proj = ClippableLinear(D, I, clip)
        self.down_proj = ClippableLinear(I, D, clip)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class VisionEncoderLayer(nn.Module):
    """Sandwich-normed pre-norm block, as in the text decoder: norm -> f -> norm -> + residual."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        D, eps = spec.hidden_size, spec.rms_norm_eps
        self.self_attn = VisionAttention(spec)
        self.mlp = VisionMLP(spec)
        self.input_layernorm = RMSNorm(D, eps)
        self.post_attention_layernorm = RMSNorm(D, eps)
        self.pre_feedforward_layernorm = RMSNorm(D, eps)
        self.post_feedforward_layernorm = RMSNorm(D, eps)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, key_bias: Tensor) -> Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, key_bias))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class VisionEncoder(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(spec) for _ in range(spec.num_hidden_layers))


class PatchEmbedder(nn.Module):
    """patch [0, 1] -> Linear(2 (p - 0.5)) + x-table[x] + y-table[y]; padding patches get no position embedding."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.input_proj = nn.Linear(spec.patch_dim, spec.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(
            torch.ones(2, spec.position_embedding_size, spec.hidden_size)
        )

    def forward(self, pixel_values: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
        w = self.input_proj.weight
        h = self.input_proj(
            (2 * (pixel_values - 0.5)).to(w.dtype)
        )  # [N, P, D]; the model maps [0,1] to [-1,1]
        pos = positions.clamp(min=0)
        table = self.position_embedding_table
        emb = F.embedding(pos[..., 0], table[0]) + F.embedding(pos[..., 1], table[1])  # [N, P, D]
        return h + torch.where(valid[..., None], emb, torch.zeros_like(emb))


class VisionTower(nn.Module):
    """Patches -> encoder -> k x k average pooling -> x sqrt(D) (-> standardise): [N, T, D] fp32 and valid [N, T]."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.spec = spec
        self.patch_embedder = PatchEmbedder(spec)
        self.encoder = VisionEncoder(spec)
        if spec.standardize:
            self.register_buffer("std_bias", torch.zeros(spec.hidden_size))
            self.register_buffer("std_scale", torch.ones(spec.hidden_size))

    def forward(self, pixel_values: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        spec = self.spec
        valid = (positions[..., 0] != -1) | (positions[..., 1] != -1)  # [N, P]; padding is (-1, -1)
        h = self.patch_embedder(pixel_values, positions, valid)
        cos, sin = axial_rope_tables(positions, spec.head_dim, spec.rope_theta, h.dtype)
        # every query sees every valid patch of its own image; padding keys are masked out
        key_bias = torch.where(valid, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]  # [N, 1, 1, P]
        for layer in self.encoder.layers:
            h = layer(h, cos, sin, key_bias)
        pooled, token_valid = pool_patches(h, positions, valid, spec.pooling_kernel_size)
        pooled = pooled * math.sqrt(spec.hidden_size)  # fp32: x sqrt(D) overflows fp16 on the 26B/31B towers
        if spec.standardize:
            pooled = (pooled - self.std_bias.float()) * self.std_scale.float()
        return pooled, token_valid


def pool_patches(h: Tensor, positions: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Average each k x k block of patches into one soft token, blocks in row-major order of the image.

    h [N, P, D] -> fp32 [N, T, D] and token validity [N, T]. The block of patch (x, y) is
    x//k + (W//k)(y//k), W the image's width in patches (from its largest x). Written as a one-hot matmul
    against arange(T), so every shape is static in P (no NonZero, no boolean indexing)."""
    T = h.shape[1] // (k * k)
    pos = positions.clamp(min=0)
    width = pos[..., 0].amax(dim=-1, keepdim=True) + 1  # [N, 1] patches per row
    block = pos[..., 0] // k + (width // k) * (pos[..., 1] // k)  # [N, P]
    hits = (block[..., None] == torch.arange(T, device=h.device)) & valid[..., None]  # [N, P, T]
    weights = hits.float() / (k * k)  # the divisor is k^2 even for a partial block, as in the reference
    pooled = weights.transpose(1, 2) @ h.float()  # [N, T, D]
    return pooled, weights.sum(dim=1) > 0


class MultimodalEmbedder(nn.Module):
    """Projector into the text model's embedding space: RMSNorm without scale, then a bias-free linear."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(d_in, eps, with_scale=False)
        self.embedding_projection = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


class Gemma4Vision(nn.Module):
    """(pixel_values [N, P, 3p^2], positions [N, P, 2]) -> soft tokens [N, T, E] (zero where invalid), valid [N, T].

    The soft tokens replace image placeholder rows of the text model's inputs_embeds unscaled (no sqrt(E))."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.spec = spec
        self.vision_tower = VisionTower(spec)
        self.embed_vision = MultimodalEmbedder(spec.hidden_size, spec.text_hidden_size, spec.rms_norm_eps)

    def forward(self, pixel_values: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        dtype = self.embed_vision.embedding_projection.weight.dtype
        pooled, valid = self.vision_tower(pixel_values, positions)
        soft = self.embed_vision(pooled.to(dtype))  # [N, T, E]
        return torch.where(valid[..., None], soft, torch.zeros_like(soft)), valid


def patch_positions(rows: int, cols: int, padded_to: int | None = None) -> Tensor:
    """[P, 2] int64 (x, y) of a rows x cols patch grid in row-major order, then (-1, -1) up to `padded_to`."""
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    grid = torch.stack([x.flatten(), y.flatten()], dim=-1)
    pad = (padded_to or rows * cols) - rows * cols
    if pad < 0:
        raise Gemma4CompileError(f"{rows}x{cols} patches do not fit in {padded_to}")
    return torch.cat([grid, torch.full((pad, 2), -1, dtype=torch.int64)])
