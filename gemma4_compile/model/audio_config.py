"""Gemma 4 audio-tower spec (E2B / E4B): a frozen view of config.json's `audio_config`.

The tower ends in the projector into the text model's embedding space, so the spec also carries the text
hidden size (`text_hidden_size`, the projector's output width). The front end's constants (16 kHz, 128
log-mel bins, 10 ms hop) are fixed by the feature extractor, not by the config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import SpecError
from .vision_config import read_config_json

MEL_BINS = 128  # the feature extractor's bins; the subsampling convs halve them twice


@dataclass(frozen=True)
class AudioTokens:
    """The prompt ids around a clip (docs/export-format.md, Multimodal): `boa, audio x n, eoa`; the `audio`
    placeholders become pad before both embedding lookups. Defaults are transformers' Gemma4Config ones."""

    boa: int = 256_000
    audio: int = 258_881
    eoa: int = 258_883

    @classmethod
    def from_hf_dict(cls, config: dict[str, Any]) -> AudioTokens:
        ids = {  # transformers spells the end id `eoa_token_index`
            "boa": config.get("boa_token_id", cls.boa),
            "audio": config.get("audio_token_id", cls.audio),
            "eoa": config.get("eoa_token_index", config.get("eoa_token_id", cls.eoa)),
        }
        for name, value in ids.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpecError(f"{name}_token_id", f"expected a non-negative int, got {value!r}")
        return cls(**ids)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def for_vocab(cls, vocab_size: int) -> AudioTokens:
        """The released ids, or, in a vocabulary too small to hold boa/eoa (the tiny presets), `<unused2>` and
        `<unused3>` (ids 7, 8; after the image ones); the placeholder needs no embedding row."""
        return cls() if vocab_size > cls.eoa else cls(boa=7, eoa=8)

    def hf_config(self) -> dict[str, int]:
        """config.json's keys for them (top level, as Gemma4Config has them)."""
        return {"boa_token_id": self.boa, "audio_token_id": self.audio, "eoa_token_index": self.eoa}


@dataclass(frozen=True)
class AudioSpec:
    hidden_size: int  # D
    num_hidden_layers: int
    num_attention_heads: int
    text_hidden_size: int  # output width of embed_audio.embedding_projection
    subsampling_conv_channels: tuple[int, int] = (128, 32)
    conv_kernel_size: int = 5  # the causal depthwise conv of each block
    residual_weight: float = 0.5  # the feed-forward halves' residual scale
    attention_chunk_size: int = 12  # queries per block
    attention_context_left: int = 13  # a query sees context_left - 1 keys, itself included
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1e9
    use_clipped_linears: bool = True
    gradient_clipping: float = 1e10  # residual-stream clamp, min'd with the dtype's max
    output_proj_dims: int = 1536
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "output_proj_dims"):
            if getattr(self, name) < 1:
                raise SpecError(f"audio_config.{name}", f"must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise SpecError(
                "audio_config.num_attention_heads",
                f"{self.num_attention_heads} heads do not divide hidden_size {self.hidden_size}",
            )
        if len(self.subsampling_conv_channels) != 2 or self.subsampling_conv_channels[0] != MEL_BINS:
            # transformers sizes input_proj_linear as channels[0] // 4 * channels[1], i.e. it reads channels[0]
            # as the mel-bin count; any other value builds a tower that cannot take the front end's features
            raise SpecError(
                "audio_config.subsampling_conv_channels",
                f"expected [{MEL_BINS}, C] (transformers reads channels[0] as the {MEL_BINS} mel bins), "
                f"got {list(self.subsampling_conv_channels)}",
            )
        if (
            self.attention_chunk_size < 1
            or self.attention_context_left < 1
            or self.attention_context_right < 0
        ):
            raise SpecError("audio_config.attention_chunk_size", "chunk and left context must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def past_horizon(self) -> int:
        """Frames before a block in its key context, and the keys a query sees, itself included: a query at
        frame q attends keys q - past_horizon < k <= q (+ context_right future ones)."""
        return self.attention_context_left - 1

    @property
    def context_size(self) -> int:
        """Keys per block of queries: the block, `past_horizon` frames before it, `context_right` after it."""
        return self.attention_chunk_size + self.past_horizon + self.attention_context_right

    @property
    def subsampled_features(self) -> int:
        """Width of the subsampled frames: (mel bins / 4) x last conv channels, frequency-major."""
        return MEL_BINS // 4 * self.subsampling_conv_channels[1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ----- Hugging Face config.json -----------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, config: dict[str, Any]) -> AudioSpec | None:
        """The audio spec of a `gemma4` config dict; None when it has no audio tower."""
        audio = config.get("audio_config") if isinstance(config, dict) else None
        if audio is None:
            return None
        if not isinstance(audio, dict):
            raise SpecError("audio_config", "expected an object or null")
        text = config.get("text_config")
        if not isinstance(text, dict) or not isinstance(text.get("hidden_size"), int):
            raise SpecError("text_config.hidden_size", "an audio tower needs the text hidden size")
        act = audio.get("hidden_act", "silu")
        if act != "silu":
            raise SpecError("audio_config.hidden_act", f"unsupported {act!r}")
        channels = audio.get("subsampling_conv_channels", [128, 32])
        if not isinstance(channels, list | tuple) or not all(_is_int(c) for c in channels):
            raise SpecError(
                "audio_config.subsampling_conv_channels", f"expected a list of ints, got {channels!r}"
            )
        return cls(
            hidden_size=_int(audio, "hidden_size", 1024),
            num_hidden_layers=_int(audio, "num_hidden_layers", 12),
            num_attention_heads=_int(audio, "num_attention_heads", 8),
            text_hidden_size=text["hidden_size"],
            subsampling_conv_channels=tuple(channels),
            conv_kernel_size=_int(audio, "conv_kernel_size", 5),
            residual_weight=_float(audio, "residual_weight", 0.5),
            attention_chunk_size=_int(audio, "attention_chunk_size", 12),
            attention_context_left=_int(audio, "attention_context_left", 13),
            attention_context_right=_int(audio, "attention_context_right", 0),
            attention_logit_cap=_float(audio, "attention_logit_cap", 50.0),
            attention_invalid_logits_value=_float(audio, "attention_invalid_logits_value", -1e9),
            use_clipped_linears=bool(audio.get("use_clipped_linears", True)),
            gradient_clipping=_float(audio, "gradient_clipping", 1e10),
            output_proj_dims=_int(audio, "output_proj_dims", 1536),
            rms_norm_eps=_float(audio, "rms_norm_eps", 1e-6),
        )

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> AudioSpec | None:
        return cls.from_hf_dict(read_config_json(checkpoint_dir))

    def to_hf_dict(self) -> dict[str, Any]:
        """`audio_config` as the released checkpoints write it."""
        return {
            "model_type": "gemma4_audio",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "hidden_act": "silu",
            "subsampling_conv_channels": list(self.subsampling_conv_channels),
            "conv_kernel_size": self.conv_kernel_size,
            "residual_weight": self.residual_weight,
            "attention_chunk_size": self.attention_chunk_size,
            "attention_context_left": self.attention_context_left,
            "attention_context_right": self.attention_context_right,
            "attention_logit_cap": self.attention_logit_cap,
            "attention_invalid_logits_value": self.attention_invalid_logits_value,
            "use_clipped_linears": self.use_clipped_linears,
            "gradient_clipping": self.gradient_clipping,
            "output_proj_dims": self.output_proj_dims,
            "rms_norm_eps": self.rms_norm_eps,
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(d: dict[str, Any], key: str, default: int) -> int:
    value = d.get(key, default)
    if value is None:
        return default
    if not _is_int(value):
        raise SpecError(f"audio_config.{key}", f"expected int, got {type(value).__name__} {value!r}")
    return value


def _float(d: dict[str, Any], key: str, default: float) -> float:
    value = d.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"audio_config.{key}", f"expected a number, got {type(value).__name__} {value!r}")
    return float(value)
