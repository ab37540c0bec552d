"""Named Gemma 4 specs: the four released variants (docs/architecture.md, released configurations) and tiny twins for CPU tests.

Each tiny preset keeps every structural feature of its big sibling (layer pattern ending global,
head_dim != global_head_dim, KV sharing + double-wide MLP, PLE, K=V with fewer global KV heads, MoE with
top_k < experts, final softcap 30) at a size that runs in seconds, with a sliding window of 8 or 16.
"""

from __future__ import annotations

from ..errors import Gemma4CompileError
from .audio_config import AudioSpec
from .config import FULL, SLIDING, Gemma4Spec
from .vision_config import VisionSpec


def _pattern(sliding_per_block: int, blocks: int) -> tuple[str, ...]:
    return tuple(([SLIDING] * sliding_per_block + [FULL]) * blocks)


_COMMON = dict(final_logit_softcapping=30.0, eos_token_id=(1, 106), dtype="bfloat16")

PRESETS: dict[str, Gemma4Spec] = {
    "e2b": Gemma4Spec(
        vocab_size=262_144,
        hidden_size=1536,
        intermediate_size=6144,
        num_hidden_layers=35,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        global_head_dim=512,
        num_global_key_value_heads=None,
        attention_k_eq_v=False,
        sliding_window=512,
        layer_types=_pattern(4, 7),
        hidden_size_per_layer_input=256,
        vocab_size_per_layer_input=262_144,
        num_kv_shared_layers=20,
        use_double_wide_mlp=True,
        max_position_embeddings=131_072,
        **_COMMON,
    ),
    "e4b": Gemma4Spec(
        vocab_size=262_144,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=42,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=256,
        global_head_dim=512,
        num_global_key_value_heads=None,
        attention_k_eq_v=False,
        sliding_window=512,
        layer_types=_pattern(5, 7),
        hidden_size_per_layer_input=256,
        vocab_size_per_layer_input=262_144,
        num_kv_shared_layers=18,
        max_position_embeddings=131_072,
        **_COMMON,
    ),
    "26b-a4b": Gemma4Spec(
        vocab_size=262_144,
        hidden_size=2816,
        intermediate_size=2112,
        num_hidden_layers=30,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        global_head_dim=512,
        num_global_key_value_heads=2,
        attention_k_eq_v=True,
        sliding_window=1024,
        layer_types=_pattern(5, 5),
        enable_moe_block=True,
        num_experts=128,
        top_k_experts=8,
        moe_intermediate_size=704,
        max_position_embeddings=262_144,
        **_COMMON,
    ),
    "31b": Gemma4Spec(
        vocab_size=262_144,
        hidden_size=5376,
        intermediate_size=21504,
        num_hidden_layers=60,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=256,
        global_head_dim=512,
        num_global_key_value_heads=4,
        attention_k_eq_v=True,
        sliding_window=1024,
        layer_types=_pattern(5, 10),
        max_position_embeddings=262_144,
        **_COMMON,
    ),
    # ---- tiny twins: same structure, CPU-sized --------------------------------------------------
    "tiny-e2b": Gemma4Spec(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=10,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=None,
        attention_k_eq_v=False,
        sliding_window=8,
        layer_types=_pattern(4, 2),
        hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=512,
        num_kv_shared_layers=5,
        use_double_wide_mlp=True,
        max_position_embeddings=4096,
        **_COMMON,
    ),
    "tiny-e4b": Gemma4Spec(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=12,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=None,
        attention_k_eq_v=False,
        sliding_window=8,
        layer_types=_pattern(5, 2),
        hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=512,
        num_kv_shared_layers=6,
        max_position_embeddings=4096,
        **_COMMON,
    ),
    "tiny-26b-a4b": Gemma4Spec(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        sliding_window=16,
        layer_types=_pattern(5, 1),
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=32,
        max_position_embeddings=4096,
        **_COMMON,
    ),
    "tiny-31b": Gemma4Spec(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        sliding_window=16,
        layer_types=_pattern(5, 1),
        max_position_embeddings=4096,
        **_COMMON,
    ),
}

DEFAULT_PRESET = "tiny-e2b"
TINY_PRESETS = tuple(name for name in PRESETS if name.startswith("tiny-"))


def get_preset(name: str) -> Gemma4Spec:
    try:
        return PRESETS[name]
    except KeyError:
        raise Gemma4CompileError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


# ----- vision towers (docs/architecture.md, vision), keyed like PRESETS ------------------------------
# E2B/E4B share one tower with clipped linears; 26B/31B share a wider one that standardises its soft tokens.
# Tiny twins keep those features, a head size divisible by 4 but not 8 on the 26B/31B side (72 = 4 x 18).
_VISION_E = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12, head_dim=64
)
_VISION_BIG = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, head_dim=72
)
_TINY_VISION_E = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    head_dim=16,
    position_embedding_size=64,
)
_TINY_VISION_BIG = dict(
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    head_dim=12,
    position_embedding_size=64,
)
_VISION_SHAPES = {
    "e2b": (_VISION_E, True),
    "e4b": (_VISION_E, True),
    "26b-a4b": (_VISION_BIG, False),
    "31b": (_VISION_BIG, False),
    "tiny-e2b": (_TINY_VISION_E, True),
    "tiny-e4b": (_TINY_VISION_E, True),
    "tiny-26b-a4b": (_TINY_VISION_BIG, False),
    "tiny-31b": (_TINY_VISION_BIG, False),
}
VISION_PRESETS: dict[str, VisionSpec] = {
    name: VisionSpec(
        **shape,
        text_hidden_size=PRESETS[name].hidden_size,
        use_clipped_linears=small,
        standardize=not small,
    )
    for name, (shape, small) in _VISION_SHAPES.items()
}

# ----- audio towers (docs/architecture.md, audio): E2B / E4B only, one shared tower -----------------------
# The tiny twin keeps 128 first conv channels (transformers reads them as the mel bins), clipped linears and
# the released attention geometry (blocks of 12, 12 keys per query, logit cap 50).
_AUDIO = dict(
    hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, subsampling_conv_channels=(128, 32)
)
_TINY_AUDIO = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    subsampling_conv_channels=(128, 4),
    output_proj_dims=48,
)
AUDIO_PRESETS: dict[str, AudioSpec] = {
    name: AudioSpec(**shape, text_hidden_size=PRESETS[name].hidden_size)
    for name, shape in (
        ("e2b", _AUDIO),
        ("e4b", _AUDIO),
        ("tiny-e2b", _TINY_AUDIO),
        ("tiny-e4b", _TINY_AUDIO),
    )
}
