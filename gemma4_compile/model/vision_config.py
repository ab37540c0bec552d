"""Gemma 4 vision-tower spec: a frozen view of config.json's `vision_config` (docs/architecture.md, vision).

The tower ends in the projector into the text model's embedding space, so the spec also carries the text
hidden size (`text_hidden_size`, the projector's output width).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, SpecError

SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)  # the processor's `max_soft_tokens` choices


@dataclass(frozen=True)
class VisionSpec:
    hidden_size: int  # D
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    text_hidden_size: int  # output width of embed_vision.embedding_projection
    patch_size: int = 16
    pooling_kernel_size: int = 3  # soft token = average of a k x k block of patches
    position_embedding_size: int = 10_240  # rows of each of the x / y position tables
    rope_theta: float = 100.0
    use_clipped_linears: bool = False  # E2B / E4B: every linear clamps its input and output
    standardize: bool = False  # 26B / 31B: soft tokens become (x - std_bias) * std_scale
    rms_norm_eps: float = 1e-6
    default_output_length: int = 280  # soft tokens per image the processor aims for (metadata)

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "head_dim",
        ):
            if getattr(self, name) < 1:
                raise SpecError(f"vision_config.{name}", f"must be positive, got {getattr(self, name)}")
        if self.head_dim % 4:  # two axes, each rotating half of the head with rotate-half pairs
            raise SpecError(
                "vision_config.head_dim", f"must be a multiple of 4 for 2-D RoPE, got {self.head_dim}"
            )

    @property
    def patch_dim(self) -> int:
        """Values per patch: 3 channels x patch_size^2 pixels."""
        return 3 * self.patch_size**2

    @property
    def patches_per_token(self) -> int:
        return self.pooling_kernel_size**2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ----- Hugging Face config.json -----------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, config: dict[str, Any]) -> VisionSpec | None:
        """The vision spec of a `gemma4` config dict; None when it has no vision tower."""
        vision = config.get("vision_config") if isinstance(config, dict) else None
        if vision is None:
            return None
        if not isinstance(vision, dict):
            raise SpecError("vision_config", "expected an object or null")
        text = config.get("text_config")
        if not isinstance(text, dict) or not isinstance(text.get("hidden_size"), int):
            raise SpecError("text_config.hidden_size", "a vision tower needs the text hidden size")
        heads = _int(vision, "num_attention_heads", 12)
        if _int(vision, "num_key_value_heads", heads) != heads:
            raise SpecError("vision_config.num_key_value_heads", "the vision tower has no grouped KV heads")
        rope = vision.get("rope_parameters") or {}
        if rope.get("rope_type", "default") not in ("default", "axial"):
            raise SpecError(
                "vision_config.rope_parameters.rope_type", f"unsupported {rope.get('rope_type')!r}"
            )
        act = vision.get("hidden_activation", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise SpecError("vision_config.hidden_activation", f"unsupported {act!r}")
        return cls(
            hidden_size=_int(vision, "hidden_size", 768),
            intermediate_size=_int(vision, "intermediate_size", 3072),
            num_hidden_layers=_int(vision, "num_hidden_layers", 16),
            num_attention_heads=heads,
            head_dim=_int(vision, "head_dim", 64),
            text_hidden_size=text["hidden_size"],
            patch_size=_int(vision, "patch_size", 16),
            pooling_kernel_size=_int(vision, "pooling_kernel_size", 3),
            position_embedding_size=_int(vision, "position_embedding_size", 10_240),
            rope_theta=float(rope.get("rope_theta", 100.0)),
            use_clipped_linears=bool(vision.get("use_clipped_linears", False)),
            standardize=bool(vision.get("standardize", False)),
            rms_norm_eps=float(vision.get("rms_norm_eps", 1e-6)),
            default_output_length=_int(vision, "default_output_length", 280),
        )

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> VisionSpec | None:
        return cls.from_hf_dict(read_config_json(checkpoint_dir))

    def to_hf_dict(self) -> dict[str, Any]:
        """`vision_config` as the released checkpoints write it."""
        return {
            "model_type": "gemma4_vision",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "head_dim": self.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": self.rms_norm_eps,
            "patch_size": self.patch_size,
            "pooling_kernel_size": self.pooling_kernel_size,
            "position_embedding_size": self.position_embedding_size,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "use_clipped_linears": self.use_clipped_linears,
            "standardize": self.standardize,
            "default_output_length": self.default_output_length,
            "attention_bias": False,
            "attention_dropout": 0.0,
        }


def read_config_json(checkpoint_dir: str | Path) -> dict[str, Any]:
    """A checkpoint's config.json, for the towers' specs (the text spec reads it with more checks first)."""
    path = Path(checkpoint_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise SpecError("<root>", f"{path} is not valid JSON ({e})") from None


def _int(d: dict[str, Any], key: str, default: int) -> int:
    value = d.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"vision_config.{key}", f"expected int, got {type(value).__name__} {value!r}")
    return value


@dataclass(frozen=True)
class ImageTokens:
    """The prompt ids around an image (docs/export-format.md, Multimodal): `boi, image x n, eoi`; the `image`
    placeholders become `pad` before both embedding lookups. Defaults are transformers' Gemma4Config ones."""

    pad: int = 0
    boi: int = 255_999
    image: int = 258_880
    eoi: int = 258_882

    @classmethod
    def from_hf_dict(cls, config: dict[str, Any]) -> ImageTokens:
        text = config.get("text_config") or {}
        ids = {
            "pad": text.get("pad_token_id", cls.pad),
            "boi": config.get("boi_token_id", cls.boi),
            "image": config.get("image_token_id", cls.image),
            "eoi": config.get("eoi_token_id", cls.eoi),
        }
        for name, value in ids.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpecError(f"{name}_token_id", f"expected a non-negative int, got {value!r}")
        return cls(**ids)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> ImageTokens:
        return cls.from_hf_dict(json.loads((Path(checkpoint_dir) / "config.json").read_text()))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def for_vocab(cls, vocab_size: int) -> ImageTokens:
        """The ids a checkpoint of `vocab_size` writes: the released ones, or, in a vocabulary too small to hold
        boi/eoi (the tiny presets), `<unused0>`/`<unused1>` (ids 5, 6; the placeholder needs no embedding row)."""
        return cls() if vocab_size > cls.eoi else cls(boi=5, eoi=6)

    def hf_config(self) -> dict[str, int]:
        """config.json's keys for them (top level, as Gemma4Config has them)."""
        return {"boi_token_id": self.boi, "image_token_id": self.image, "eoi_token_id": self.eoi}


def bidirectional_image_blocks(config: dict[str, Any], k_eq_v: bool) -> bool:
    """Whether the text decoder lets each image run attend both ways on sliding layers (26B/31B,
    `use_bidirectional_attention: "vision"`). The released 26B/31B configs say so; their tiny twins' configs
    leave it null, so the family (K=V global layers, only on 26B/31B) decides too."""
    text = config.get("text_config") or {}
    return text.get("use_bidirectional_attention") == "vision" or k_eq_v
