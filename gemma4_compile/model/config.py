"""Gemma 4 text-decoder spec: a frozen view of a Hugging Face config.json plus the per-layer plan.

The plan is computed once (`Gemma4Spec.layers`) so that the model, the exporter and the engine builder
never re-derive layer types, head sizes, KV sharing or MLP widths (docs/architecture.md: layer types,
attention, KV sharing, MLP, MoE, released configurations).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from ..errors import SpecError

SLIDING, FULL = "sliding_attention", "full_attention"
LayerKind = Literal["sliding", "global"]


@dataclass(frozen=True)
class LayerPlan:
    """Everything that differs between decoder layers, resolved from the config."""

    index: int
    kind: LayerKind
    head_dim: int
    num_kv_heads: int
    has_v_proj: bool  # False on global layers of K=V models: V is the un-normed K projection
    kv_producer: int | None  # KV-shared consumer: the layer whose K/V it reads; None if it computes its own
    cache_index: int | None  # position among cache-owning layers; None for consumers
    mlp_width: int
    moe: bool
    window: int  # sliding window W (keys including self); 0 on global layers
    rope_theta: float
    rope_rotary_dims: int  # dims that rotate (2 x rotating pairs); == head_dim for default RoPE

    @property
    def is_sliding(self) -> bool:
        return self.kind == "sliding"

    @property
    def owns_cache(self) -> bool:
        return self.kv_producer is None


@dataclass(frozen=True)
class Gemma4Spec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    global_head_dim: int
    num_global_key_value_heads: int | None
    attention_k_eq_v: bool
    sliding_window: int
    layer_types: tuple[str, ...]
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 262_144
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    final_logit_softcapping: float | None = 30.0
    rms_norm_eps: float = 1e-6
    rope_theta_sliding: float = 10_000.0
    rope_theta_global: float = 1_000_000.0
    partial_rotary_factor_global: float = 0.25
    max_position_embeddings: int = 131_072
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: tuple[int, ...] = (1,)
    tie_word_embeddings: bool = True
    hidden_activation: str = "gelu_pytorch_tanh"
    dtype: str = "bfloat16"
    # per-layer (head_dim, num_kv_heads) overrides from the newer `per_layer_config` style, if given
    layer_overrides: tuple[tuple[int, int, int], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        _validate(self)

    # ----- derived -------------------------------------------------------------------------------
    @property
    def has_ple(self) -> bool:
        return self.hidden_size_per_layer_input > 0

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    @cached_property
    def layers(self) -> tuple[LayerPlan, ...]:
        return _plan_layers(self)

    @cached_property
    def cache_layers(self) -> tuple[LayerPlan, ...]:
        return tuple(p for p in self.layers if p.owns_cache)

    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["eos_token_id"] = list(self.eos_token_id)
        d["layer_overrides"] = [list(o) for o in self.layer_overrides]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Gemma4Spec:
        """Inverse of `to_dict` (used by manifests)."""
        d = dict(d)
        d["layer_types"] = tuple(d["layer_types"])
        d["eos_token_id"] = tuple(d["eos_token_id"])
        d["layer_overrides"] = tuple(tuple(o) for o in d.get("layer_overrides", ()))
        return cls(**d)

    # ----- Hugging Face config.json -----------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, config: dict[str, Any]) -> Gemma4Spec:
        """Parse a `gemma4` (multimodal, with text_config) or `gemma4_text` config dict."""
        if not isinstance(config, dict):
            raise SpecError("<root>", "config.json must hold a JSON object")
        model_type = config.get("model_type")
        if model_type == "gemma4":
            text = config.get("text_config")
            if not isinstance(text, dict):
                raise SpecError("text_config", "a 'gemma4' config needs a text_config object")
            text = {"dtype": config.get("dtype", config.get("torch_dtype")), **text}
        elif model_type == "gemma4_text":
            text = config
        else:
            raise SpecError("model_type", f"expected 'gemma4' or 'gemma4_text', got {model_type!r}")
        return _spec_from_text_config(text)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> Gemma4Spec:
        from ..errors import CheckpointError

        if not Path(checkpoint_dir).is_dir():
            raise CheckpointError(f"checkpoint directory {checkpoint_dir} does not exist")
        path = Path(checkpoint_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"no config.json in {checkpoint_dir}")
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SpecError("<root>", f"{path} is not valid JSON ({e})") from None
        except UnicodeDecodeError:
            raise SpecError("<root>", f"{path} is not UTF-8 text (a binary file?)") from None
        return cls.from_hf_dict(config)

    def to_hf_text_config(self) -> dict[str, Any]:
        """The text_config as the released checkpoints write it (older attribute style)."""
        return {
            "model_type": "gemma4_text",
            "architectures": ["Gemma4ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "global_head_dim": self.global_head_dim,
            "num_global_key_value_heads": self.num_global_key_value_heads,
            "attention_k_eq_v": self.attention_k_eq_v,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "hidden_size_per_layer_input": self.hidden_size_per_layer_input,
            "vocab_size_per_layer_input": self.vocab_size_per_layer_input,
            "num_kv_shared_layers": self.num_kv_shared_layers,
            "use_double_wide_mlp": self.use_double_wide_mlp,
            "enable_moe_block": self.enable_moe_block,
            "num_experts": self.num_experts,
            "top_k_experts": self.top_k_experts,
            "moe_intermediate_size": self.moe_intermediate_size,
            "final_logit_softcapping": self.final_logit_softcapping,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_theta_sliding},
                "full_attention": {
                    "rope_type": "proportional",
                    "partial_rotary_factor": self.partial_rotary_factor_global,
                    "rope_theta": self.rope_theta_global,
                },
            },
            "max_position_embeddings": self.max_position_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) > 1 else self.eos_token_id[0],
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_activation": self.hidden_activation,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_bidirectional_attention": None,
            "dtype": self.dtype,
        }

    def to_hf_config(self, multimodal: bool = True) -> dict[str, Any]:
        """A config.json: the released multimodal layout (no vision/audio towers) or text-only."""
        text = self.to_hf_text_config()
        if not multimodal:
            return text
        return {
            "architectures": ["Gemma4ForConditionalGeneration"],
            "model_type": "gemma4",
            "text_config": text,
            "vision_config": None,
            "audio_config": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": self.dtype,
            "transformers_version": "5.5.0.dev0",
        }


# ----- parsing ----------------------------------------------------------------------------------

_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "sliding_window",
)


def _req(d: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in d or d[key] is None:
        if default is ...:
            raise SpecError(key, "is required")
        return default
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise SpecError(key, f"expected {kinds[0].__name__}, got bool {value!r}")
    if not isinstance(value, kinds):
        raise SpecError(key, f"expected {kinds[0].__name__}, got {type(value).__name__} {value!r}")
    return value


def _rope(text: dict[str, Any]) -> tuple[float, float, float]:
    rope = text.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise SpecError("rope_parameters", "expected an object keyed by layer type")
    sliding = rope.get(SLIDING, {}) or {}
    full = rope.get(FULL, {}) or {}
    for kind, value in ((SLIDING, sliding), (FULL, full)):
        if not isinstance(value, dict):
            raise SpecError(f"rope_parameters.{kind}", f"expected an object, got {value!r}")
    if full.get("rope_type", "proportional") != "proportional":
        raise SpecError("rope_parameters.full_attention.rope_type", f"unsupported {full.get('rope_type')!r}")
    if sliding.get("rope_type", "default") != "default":
        raise SpecError(
            "rope_parameters.sliding_attention.rope_type", f"unsupported {sliding.get('rope_type')!r}"
        )
    if _number(full, "factor", 1.0, f"rope_parameters.{FULL}") != 1.0:
        raise SpecError("rope_parameters.full_attention.factor", "RoPE scaling factors are not supported")
    return (
        _number(sliding, "rope_theta", 10_000.0, f"rope_parameters.{SLIDING}"),
        _number(full, "rope_theta", 1_000_000.0, f"rope_parameters.{FULL}"),
        _number(full, "partial_rotary_factor", 0.25, f"rope_parameters.{FULL}"),
    )


def _number(d: dict[str, Any], key: str, default: float, where: str) -> float:
    """A JSON number (not a bool, not a string) that is finite, as float."""
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"{where}.{key}", f"expected a finite number, got {value!r}")
    return float(value)


def _per_layer_overrides(text: dict[str, Any], layer_types: list[str]) -> tuple[tuple[int, int, int], ...]:
    plc = text.get("per_layer_config")
    if plc is None:
        return ()
    if not isinstance(plc, dict):
        raise SpecError("per_layer_config", "expected an object keyed by layer index")
    out = []
    for key, ov in plc.items():
        try:
            idx = int(key)
        except (TypeError, ValueError):
            raise SpecError("per_layer_config", f"key {key!r} is not a layer index") from None
        if not 0 <= idx < len(layer_types) or not isinstance(ov, dict):
            raise SpecError("per_layer_config", f"entry {key!r} is not a valid layer override")
        unknown = set(ov) - {"head_dim", "num_key_value_heads"}
        if unknown:
            raise SpecError(f"per_layer_config.{key}", f"unsupported override(s) {sorted(unknown)}")
        hd = _req(ov, "head_dim", int, -1)
        kv = _req(ov, "num_key_value_heads", int, -1)
        out.append((idx, hd, kv))
    return tuple(sorted(out))


def _spec_from_text_config(text: dict[str, Any]) -> Gemma4Spec:
    for k in _INT_FIELDS:
        _req(text, k, int)
    n_layers = text["num_hidden_layers"]
    layer_types = text.get("layer_types")
    if layer_types is None:
        layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)]
    if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
        raise SpecError("layer_types", "expected a list of strings")
    overrides = _per_layer_overrides(text, layer_types)
    head_dim = _req(text, "head_dim", int, 256)
    # Older style: explicit attributes. Newer style: per_layer_config on the full layers.
    global_head_dim = text.get("global_head_dim")
    n_global_kv = text.get("num_global_key_value_heads")
    full_overrides = [o for o in overrides if layer_types[o[0]] == FULL]
    if global_head_dim is None:
        hds = {o[1] for o in full_overrides if o[1] > 0}
        if len(hds) > 1:
            raise SpecError("per_layer_config", f"full-attention layers disagree on head_dim: {sorted(hds)}")
        global_head_dim = hds.pop() if hds else (512 if not overrides else head_dim)
    if n_global_kv is None and full_overrides:
        kvs = {o[2] for o in full_overrides if o[2] > 0}
        if len(kvs) > 1:
            raise SpecError("per_layer_config", f"full-attention layers disagree on KV heads: {sorted(kvs)}")
        n_global_kv = kvs.pop() if kvs else None
    if global_head_dim is not None and (
        isinstance(global_head_dim, bool) or not isinstance(global_head_dim, int)
    ):
        raise SpecError("global_head_dim", f"expected int, got {global_head_dim!r}")
    if n_global_kv is not None and (isinstance(n_global_kv, bool) or not isinstance(n_global_kv, int)):
        raise SpecError("num_global_key_value_heads", f"expected int or null, got {n_global_kv!r}")
    eos = text.get("eos_token_id", 1)
    eos = tuple(eos) if isinstance(eos, list) else (eos,)
    if not eos or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos):
        raise SpecError(
            "eos_token_id", f"expected a token id or a list of them, got {text.get('eos_token_id')!r}"
        )
    theta_s, theta_g, partial = _rope(text)
    softcap = text.get("final_logit_softcapping")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))):
        raise SpecError("final_logit_softcapping", f"expected a number or null, got {softcap!r}")
    bidir = text.get("use_bidirectional_attention")
    if bidir == "all":
        raise SpecError("use_bidirectional_attention", "'all' (non-causal text) is not supported")
    return Gemma4Spec(
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_hidden_layers=n_layers,
        num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=text["num_key_value_heads"],
        head_dim=head_dim,
        global_head_dim=global_head_dim,
        num_global_key_value_heads=n_global_kv,
        attention_k_eq_v=_req(text, "attention_k_eq_v", bool, False),
        sliding_window=text["sliding_window"],
        layer_types=tuple(layer_types),
        hidden_size_per_layer_input=_req(text, "hidden_size_per_layer_input", int, 0),
        vocab_size_per_layer_input=_req(text, "vocab_size_per_layer_input", int, 262_144),
        num_kv_shared_layers=_req(text, "num_kv_shared_layers", int, 0),
        use_double_wide_mlp=_req(text, "use_double_wide_mlp", bool, False),
        enable_moe_block=_req(text, "enable_moe_block", bool, False),
        num_experts=_req(text, "num_experts", int, None),
        top_k_experts=_req(text, "top_k_experts", int, None),
        moe_intermediate_size=_req(text, "moe_intermediate_size", int, None),
        final_logit_softcapping=None if softcap is None else float(softcap),
        rms_norm_eps=float(_req(text, "rms_norm_eps", (int, float), 1e-6)),
        rope_theta_sliding=theta_s,
        rope_theta_global=theta_g,
        partial_rotary_factor_global=partial,
        max_position_embeddings=_req(text, "max_position_embeddings", int, 131_072),
        pad_token_id=_req(text, "pad_token_id", int, 0),
        bos_token_id=_req(text, "bos_token_id", int, 2),
        eos_token_id=eos,
        tie_word_embeddings=_req(text, "tie_word_embeddings", bool, True),
        hidden_activation=_req(text, "hidden_activation", str, "gelu_pytorch_tanh"),
        dtype=str(text.get("dtype") or text.get("torch_dtype") or "bfloat16"),
        layer_overrides=overrides,
    )


def _validate(s: Gemma4Spec) -> None:
    positive = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "global_head_dim",
        "sliding_window",
    )
    for name in positive:
        value = getattr(s, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SpecError(name, f"must be a positive integer, got {value!r}")
    if len(s.layer_types) != s.num_hidden_layers:
        raise SpecError(
            "layer_types", f"has {len(s.layer_types)} entries but num_hidden_layers is {s.num_hidden_layers}"
        )
    bad = sorted({t for t in s.layer_types if t not in (SLIDING, FULL)})
    if bad:
        raise SpecError("layer_types", f"unknown layer type(s) {bad}; expected {SLIDING!r} or {FULL!r}")
    if s.layer_types[-1] != FULL:
        raise SpecError("layer_types", "the last layer must be 'full_attention'")
    if s.hidden_activation != "gelu_pytorch_tanh":
        raise SpecError("hidden_activation", f"Gemma 4 uses 'gelu_pytorch_tanh', got {s.hidden_activation!r}")
    if s.dtype not in ("bfloat16", "float16", "float32"):
        raise SpecError("dtype", f"unsupported dtype {s.dtype!r}")
    if s.hidden_size_per_layer_input < 0:
        raise SpecError("hidden_size_per_layer_input", "must be >= 0")
    if not 0 <= s.num_kv_shared_layers < s.num_hidden_layers:
        raise SpecError(
            "num_kv_shared_layers", f"must be in [0, {s.num_hidden_layers}), got {s.num_kv_shared_layers}"
        )
    if s.num_kv_shared_layers:
        producers = set(s.layer_types[: s.first_kv_shared_layer])
        missing = sorted(set(s.layer_types[s.first_kv_shared_layer :]) - producers)
        if missing:
            raise SpecError(
                "num_kv_shared_layers",
                f"shared layers of type {missing} have no earlier non-shared layer of that type to read K/V from",
            )
    kv_heads = [(p.index, p.num_kv_heads) for p in _plan_layers(s)]
    for idx, n in kv_heads:
        if n <= 0 or s.num_attention_heads % n:
            raise SpecError(
                "num_key_value_heads" if s.layer_types[idx] == SLIDING else "num_global_key_value_heads",
                f"layer {idx}: {s.num_attention_heads} query heads are not a multiple of {n} KV heads",
            )
    if s.final_logit_softcapping is not None and not 0 < s.final_logit_softcapping < math.inf:
        raise SpecError("final_logit_softcapping", "must be positive or null")
    _validate_numerics(s)
    if not 0.0 < s.partial_rotary_factor_global <= 1.0:
        raise SpecError("rope_parameters.full_attention.partial_rotary_factor", "must be in (0, 1]")
    if s.enable_moe_block:
        for name in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            value = getattr(s, name)
            if value is None or value <= 0:
                raise SpecError(
                    name, f"must be a positive integer when enable_moe_block is true, got {value!r}"
                )
        if s.top_k_experts > s.num_experts:
            raise SpecError("top_k_experts", f"{s.top_k_experts} exceeds num_experts {s.num_experts}")


MAX_POSITIONS = 2**31 - 1  # positions, cache lengths and shapes are int32 in TensorRT engines


def _validate_numerics(s: Gemma4Spec) -> None:
    """Values the math cannot use: a non-positive epsilon or RoPE base, odd head sizes (RoPE rotates pairs),
    positions beyond int32, token ids outside the vocabulary."""
    if not 0 < s.rms_norm_eps < 1:
        raise SpecError("rms_norm_eps", f"must be in (0, 1), got {s.rms_norm_eps!r}")
    for name in ("rope_theta_sliding", "rope_theta_global"):
        if not 1 < getattr(s, name) < math.inf:
            kind = SLIDING if name.endswith("sliding") else FULL
            raise SpecError(f"rope_parameters.{kind}.rope_theta", f"must be > 1, got {getattr(s, name)!r}")
    if not 1 <= s.max_position_embeddings <= MAX_POSITIONS:
        raise SpecError(
            "max_position_embeddings", f"must be in [1, {MAX_POSITIONS}], got {s.max_position_embeddings}"
        )
    for name in ("pad_token_id", "bos_token_id"):
        if not 0 <= getattr(s, name) < s.vocab_size:
            raise SpecError(name, f"must be a token id in [0, {s.vocab_size}), got {getattr(s, name)}")
    for p in _plan_layers(s):
        if p.head_dim <= 0 or p.head_dim % 2:
            field_ = "head_dim" if p.kind == "sliding" else "global_head_dim"
            raise SpecError(
                field_,
                f"layer {p.index}: head_dim {p.head_dim} must be a positive even number (RoPE rotates pairs)",
            )


def check_max_seq_len(spec: Gemma4Spec, max_seq_len: int) -> str | None:
    """Why `max_seq_len` cannot be exported for `spec` (None when it can): positions beyond the config's
    max_position_embeddings are outside what its RoPE was made for, and shapes are int32."""
    limit = min(spec.max_position_embeddings, MAX_POSITIONS)
    if not 1 <= max_seq_len <= limit:
        return (
            f"--max-seq-len must be in [1, {limit}] (the config's max_position_embeddings), got {max_seq_len}"
        )
    return None


def _plan_layers(s: Gemma4Spec) -> tuple[LayerPlan, ...]:
    overrides = {idx: (hd, kv) for idx, hd, kv in s.layer_overrides}
    first_shared = s.num_hidden_layers - s.num_kv_shared_layers
    last_of_type = {t: i for i, t in enumerate(s.layer_types[:first_shared])}
    plans: list[LayerPlan] = []
    cache_index = 0
    for i, t in enumerate(s.layer_types):
        sliding = t == SLIDING
        head_dim = s.head_dim if sliding else s.global_head_dim
        kv = s.num_key_value_heads
        if not sliding and s.attention_k_eq_v and s.num_global_key_value_heads is not None:
            kv = s.num_global_key_value_heads
        ov_hd, ov_kv = overrides.get(i, (-1, -1))
        head_dim = ov_hd if ov_hd > 0 else head_dim
        kv = ov_kv if ov_kv > 0 else kv
        consumer = i >= first_shared
        producer = last_of_type.get(t) if consumer else None
        if consumer and producer is not None:
            # a consumer reads the producer's K/V, so geometry is the producer's
            head_dim, kv = plans[producer].head_dim, plans[producer].num_kv_heads
        width = s.intermediate_size * (2 if s.use_double_wide_mlp and consumer else 1)
        rot = head_dim if sliding else 2 * int(s.partial_rotary_factor_global * head_dim // 2)
        plans.append(
            LayerPlan(
                index=i,
                kind="sliding" if sliding else "global",
                head_dim=head_dim,
                num_kv_heads=kv,
                has_v_proj=sliding or not s.attention_k_eq_v,
                kv_producer=producer if consumer else None,
                cache_index=None if consumer else cache_index,
                mlp_width=width,
                moe=s.enable_moe_block,
                window=s.sliding_window if sliding else 0,
                rope_theta=s.rope_theta_sliding if sliding else s.rope_theta_global,
                rope_rotary_dims=rot,
            )
        )
        if not consumer:
            cache_index += 1
    return tuple(plans)
