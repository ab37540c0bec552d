"""Gemma 4 audio tower (E2B / E4B) and its projector in plain PyTorch, written against
docs/architecture.md (audio): a USM-style conformer over 128-bin log-mel frames.

Letters: B clips, T mel frames, T4 = ceil(ceil(T / 2) / 2) subsampled frames (one soft token each, 40 ms),
D audio width, A heads, Dh head dim, E text width; attention blocks: nb = ceil(T4 / C) blocks of C queries,
each attending a context of W = C + past + right frames.

Input is the feature extractor's layout: `features` [B, T, 128] and `mask` [B, T] (True = real audio; right
padding). Output is padded and static in shape: soft tokens [B, T4, E] (zero where invalid) and validity
[B, T4]. Every shape is derived from T with integer ops and every gather is an index tensor, so one traced
graph serves any length. Module and parameter names are the checkpoint's (`audio_tower.layers.0.self_attn.
q_proj.linear.weight`, ...), so weights load by name.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import Gemma4CompileError
from .audio_config import MEL_BINS, AudioSpec
from .model import RMSNorm
from .vision import ClippableLinear, MultimodalEmbedder


def residual_clip(spec: AudioSpec, dtype: torch.dtype) -> float:
    """The residual-stream clamp: `gradient_clipping` (1e10), lowered to the dtype's max (65504 in fp16)."""
    return min(spec.gradient_clipping, torch.finfo(dtype).max)


def conv_forward(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """`conv(x)` in the weight's dtype, except bf16: computed in fp32, then cast back, since ONNX Conv takes no
    bfloat16 before opset 22 (the graphs are opset 20, so a bf16 Conv fails the checker)."""
    w = conv.weight
    if w.dtype != torch.bfloat16:
        return conv(x.to(w.dtype))
    bias = None if conv.bias is None else conv.bias.float()
    return conv._conv_forward(x.float(), w.float(), bias).to(w.dtype)


class SubSampleLayer(nn.Module):
    """Zero the padding frames -> Conv2d 3x3 stride 2 -> LayerNorm over channels (no bias) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(c_out, eps=eps, bias=False)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        x = x * mask[:, None, :, None]  # [B, C, T, F]
        x = conv_forward(self.conv, x)  # [B, C', ceil(T/2), ceil(F/2)]
        x = F.relu(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        # a subsampled frame is valid iff its centre input frame is: mask[:, ::2], written as a gather of the
        # conv's own output length, so torch.export need not prove ceil(T/2) == (T + 1) // 2 (a guard)
        return x, mask[:, torch.arange(x.shape[2], device=mask.device) * 2]


class SubSampleConvProjection(nn.Module):
    """[B, T, 128] mel -> two stride-2 conv layers -> [B, T4, 32 * C1] (frequency-major) -> Linear -> [B, T4, D]."""

    def __init__(self, spec: AudioSpec):
        super().__init__()
        c0, c1 = spec.subsampling_conv_channels
        self.layer0 = SubSampleLayer(1, c0, spec.rms_norm_eps)
        self.layer1 = SubSampleLayer(c0, c1, spec.rms_norm_eps)
        self.input_proj_linear = nn.Linear(spec.subsampled_features, spec.hidden_size, bias=False)

    def forward(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        x, mask = self.layer0(features[:, None], mask)
        x, mask = self.layer1(x, mask)  # [B, C1, T4, 32]
        return self.input_proj_linear(x.permute(0, 2, 3, 1).flatten(2)), mask


def relative_position_table(spec: AudioSpec, device: torch.device | str) -> Tensor:
    """[P, D] fp32 sinusoids [sin | cos] of the relative distances W//2, ..., 1, 0 (Transformer-XL), P = W//2 + 1;
    D/2 timescales geometric from 1 to 10^4."""
    n = spec.hidden_size // 2
    inv_timescales = torch.exp(
        torch.arange(n, device=device, dtype=torch.float32) * -(math.log(1e4) / max(n - 1, 1))
    )
    distance = torch.arange(spec.context_size // 2, -1, -1, device=device, dtype=torch.float32)
    angles = distance[:, None] * inv_timescales  # [P, D/2]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def rel_shift(x: Tensor, context: int) -> Tensor:
    """[..., C, P] -> [..., C, W]: out[i, j] = x[i, j - i] for 0 <= j - i < P, else 0 (Transformer-XL appendix B:
    pad each row to W + 1, read the flat rows back W at a time)."""
    C, P = x.shape[-2:]
    x = F.pad(x, (0, context + 1 - P)).flatten(-2)  # [..., C * (W + 1)]
    return x[..., : C * context].unflatten(-1, (C, context))


def block_frames(spec: AudioSpec, frames: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Frame indices of each block's queries [nb, C] and keys [nb, W]; some fall outside [0, frames)."""
    C, past = spec.attention_chunk_size, spec.past_horizon
    nb = (frames + C - 1) // C
    start = torch.arange(nb, device=device)[:, None] * C
    queries = start + torch.arange(C, device=device)
    keys = start - past + torch.arange(spec.context_size, device=device)
    return queries, keys


def gather_frames(x: Tensor, index: Tensor) -> Tensor:
    """x [B, T, ...] at frame `index` [nb, n] -> [B, nb, n, ...], zero (False) where the index is outside [0, T)."""
    T = x.shape[1]
    inside = ((index >= 0) & (index < T)).reshape(1, *index.shape, *[1] * (x.dim() - 2))
    picked = x[:, index.clamp(0, T - 1)]
    if x.dtype == torch.bool:  # onnxruntime has no boolean Where
        return picked & inside
    return torch.where(inside, picked, torch.zeros((), dtype=x.dtype, device=x.device))


def chunk_attention_mask(spec: AudioSpec, valid: Tensor) -> Tensor:
    """[B, nb, C, W] bool: may block query i attend context slot j.

    The key must be a real frame (inside the clip and valid) within the window: query frame - key frame in
    [0, past_horizon) or, with right context, in (-context_right, 0). Block padding queries (frame >= T) see
    nothing, so their rows are uniform after the -1e9 fill, as in transformers."""
    T = valid.shape[1]
    queries, keys = block_frames(spec, T, valid.device)
    dist = queries[:, :, None] - keys[:, None, :]  # [nb, C, W]
    window = ((dist >= 0) & (dist < spec.past_horizon)) | (
        (dist < 0) & (-dist < spec.attention_context_right)
    )
    key_ok = gather_frames(valid, keys)  # [B, nb, W]
    return window & (queries < T)[:, :, None] & key_ok[:, :, None, :]


class AudioAttention(nn.Module):
    """Chunked local attention in fp32: blocks of C queries over their W-frame context, content + relative
    position logits, soft cap, invalid keys filled with -1e9, softmax."""

    def __init__(self, spec: AudioSpec):
        super().__init__()
        D, clip = spec.hidden_size, spec.use_clipped_linears
        self.spec = spec
        self.head_dim = spec.head_dim
        self.q_proj = ClippableLinear(D, D, clip)
        self.k_proj = ClippableLinear(D, D, clip)
        self.v_proj = ClippableLinear(D, D, clip)
        self.post = ClippableLinear(D, D, clip)
        self.relative_k_proj = nn.Linear(D, D, bias=False)
        self.per_dim_scale = nn.Parameter(torch.zeros(spec.head_dim))

    def _heads(self, x: Tensor) -> Tensor:  # [..., A*Dh] -> [..., A, Dh] in fp32
        return x.float().unflatten(-1, (-1, self.head_dim))

    def forward(self, x: Tensor, rel_table: Tensor, allowed: Tensor) -> Tensor:
        spec, Dh = self.spec, self.head_dim
        T = x.shape[1]
        queries, keys = block_frames(spec, T, x.device)
        # the scales are base-2 logits (1/ln 2); softplus(per_dim_scale) is a learned per-dim temperature
        q = self._heads(self.q_proj(x)) * (Dh**-0.5 / math.log(2)) * F.softplus(self.per_dim_scale.float())
        k = self._heads(self.k_proj(x)) * (math.log(1 + math.e) / math.log(2))
        v = self._heads(self.v_proj(x))
        q = gather_frames(q, queries).permute(0, 3, 1, 2, 4)  # [B, A, nb, C, Dh]
        k = gather_frames(k, keys).permute(0, 3, 1, 4, 2)  # [B, A, nb, Dh, W]
        v = gather_frames(v, keys).permute(0, 3, 1, 2, 4)  # [B, A, nb, W, Dh]
        rel_k = self._heads(
            self.relative_k_proj(rel_table.to(self.relative_k_proj.weight.dtype))
        )  # [P, A, Dh]
        position = rel_shift(q @ rel_k.permute(1, 2, 0)[:, None], spec.context_size)  # [B, A, nb, C, W]
        cap = spec.attention_logit_cap
        logits = torch.tanh((q @ k + position) / cap) * cap
        logits = torch.where(allowed[:, None], logits, spec.attention_invalid_logits_value)
        out = torch.softmax(logits, dim=-1) @ v  # [B, A, nb, C, Dh]
        out = out.permute(0, 2, 3, 1, 4).flatten(3).flatten(1, 2)  # [B, nb*C, D]
        out = out[:, torch.arange(T, device=x.device)]  # the first T rows, as a gather: no nb*C >= T guard
        return self.post(out.to(x.dtype))


class AudioFeedForward(nn.Module):
    """Macaron half-step: clamp -> RMSNorm -> Linear(D, 4D) -> SiLU -> Linear(4D, D) -> clamp -> RMSNorm -> x w + x."""

    def __init__(self, spec: AudioSpec):
        super().__init__()
        D, clip, eps = spec.hidden_size, spec.use_clipped_linears, spec.rms_norm_eps
        self.spec = spec
        self.ffw_layer_1 = ClippableLinear(D, 4 * D, clip)
        self.ffw_layer_2 = ClippableLinear(4 * D, D, clip)
        self.pre_layer_norm = RMSNorm(D, eps)
        self.post_layer_norm = RMSNorm(D, eps)

    def forward(self, x: Tensor) -> Tensor:
        c = residual_clip(self.spec, x.dtype)
        h = self.ffw_layer_2(F.silu(self.ffw_layer_1(self.pre_layer_norm(torch.clamp(x, -c, c)))))
        return self.post_layer_norm(torch.clamp(h, -c, c)) * self.spec.residual_weight + x


class AudioLightConv1d(nn.Module):
    """RMSNorm -> Linear(D, 2D) -> GLU -> causal depthwise conv (kernel k, k - 1 frames of left padding)
    -> clamp -> RMSNorm -> SiLU -> Linear(D, D) -> + x."""

    def __init__(self, spec: AudioSpec):
        super().__init__()
        D, clip, eps, k = spec.hidden_size, spec.use_clipped_linears, spec.rms_norm_eps, spec.conv_kernel_size
        self.spec = spec
        self.linear_start = ClippableLinear(D, 2 * D, clip)
        self.linear_end = ClippableLinear(D, D, clip)
        self.depthwise_conv1d = nn.Conv1d(D, D, kernel_size=k, groups=D, bias=False)
        self.pre_layer_norm = RMSNorm(D, eps)
        self.conv_norm = RMSNorm(D, eps)

    def forward(self, x: Tensor) -> Tensor:
        h = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1)  # [B, T, D]
        h = F.pad(h.transpose(1, 2), (self.depthwise_conv1d.kernel_size[0] - 1, 0))  # causal: pad the past
        h = conv_forward(self.depthwise_conv1d, h).transpose(1, 2)
        c = residual_clip(self.spec, h.dtype)
        return self.linear_end(F.silu(self.conv_norm(torch.clamp(h, -c, c)))) + x


class AudioLayer(nn.Module):
    """Conformer block: FF/2 -> attention -> light conv -> FF/2 -> RMSNorm, with the residual clamped."""

    def __init__(self, spec: AudioSpec):
        super().__init__()
        D = spec.hidden_size
        self.spec = spec
        self.feed_forward1 = AudioFeedForward(spec)
        self.self_attn = AudioAttention(spec)
        self.lconv1d = AudioLightConv1d(spec)
        self.feed_forward2 = AudioFeedForward(spec)
        self.norm_pre_attn = RMSNorm(D, spec.rms_norm_eps)
        self.norm_post_attn = RMSNorm(D, spec.rms_norm_eps)
        self.norm_out = RMSNorm(D, spec.rms_norm_eps)

    def forward(self, h: Tensor, rel_table: Tensor, allowed: Tensor) -> Tensor:
        c = residual_clip(self.spec, h.dtype)
        h = self.feed_forward1(h)
        attn = self.self_attn(self.norm_pre_attn(torch.clamp(h, -c, c)), rel_table, allowed)
        h = h + self.norm_post_attn(torch.clamp(attn, -c, c))
        h = self.feed_forward2(self.lconv1d(h))
        return self.norm_out(torch.clamp(h, -c, c))


class AudioTower(nn.Module):
    """(features [B, T, 128], mask [B, T]) -> (hidden [B, T4, output_proj_dims], valid [B, T4])."""

    def __init__(self, spec: AudioSpec):
        super().__init__()
        self.spec = spec
        self.subsample_conv_projection = SubSampleConvProjection(spec)
        self.layers = nn.ModuleList(AudioLayer(spec) for _ in range(spec.num_hidden_layers))
        self.output_proj = nn.Linear(spec.hidden_size, spec.output_proj_dims, bias=True)

    def forward(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        h, valid = self.subsample_conv_projection(features, mask)
        allowed = chunk_attention_mask(self.spec, valid)  # shared by every layer
        rel_table = relative_position_table(self.spec, h.device)
        for layer in self.layers:
            h = layer(h, rel_table, allowed)
        return self.output_proj(h), valid


class Gemma4Audio(nn.Module):
    """(features [B, T, 128], mask [B, T]) -> soft tokens [B, T4, E] (zero where invalid), valid [B, T4].

    The soft tokens replace audio placeholder rows of the text model's inputs_embeds unscaled (no sqrt(E))."""

    def __init__(self, spec: AudioSpec):
        super().__init__()
        self.spec = spec
        self.audio_tower = AudioTower(spec)
        self.embed_audio = MultimodalEmbedder(spec.output_proj_dims, spec.text_hidden_size, spec.rms_norm_eps)

    def forward(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if features.shape[-1] != MEL_BINS:
            raise Gemma4CompileError(
                f"audio features have {features.shape[-1]} mel bins, expected {MEL_BINS}"
            )
        hidden, valid = self.audio_tower(features, mask.bool())
        soft = self.embed_audio(hidden)  # [B, T4, E]
        return torch.where(valid[..., None], soft, torch.zeros_like(soft)), valid
