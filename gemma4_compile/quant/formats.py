"""What `export --quant` means: formats, roles, which tensor gets which format, and the manifest record.

Pure Python (no torch, no numpy): the CLI, the manifest and the exporter read these tables.

Defaults (docs/export-format.md, "Quantization"): attention q/k/v/o and MLP gate/up/down take `--quant`; the
LM head (the tied embedding used as a GEMM) takes int8, because peers found Gemma's tied head the most sensitive
linear (docs/export-format.md, "Quantization", the role table); norms, the router and the PLE projections stay in the export dtype
(tiny, and quantizing them costs far more accuracy than it saves bytes). The token embedding and the PLE table
stay in the export dtype in this version: they are gathers, not MatMuls, and their int8 form (a host-side row
reader) is future work. MoE experts are refused rather than silently left in 16 bits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ExportError

SCHEME, METHOD = "symmetric", "rtn"  # signed codes, no zero point; round-to-nearest absmax per block
BITS = {"int4": 4, "int8": 8}  # the formats this version writes
NOT_YET = ("fp8", "nvfp4")  # accepted by the CLI only to be refused in one line
QUANT_CHOICES = ("none", *BITS, *NOT_YET)
BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK = 32  # ggml Q4_0 / ORT-GenAI default; the grid Google's QAT checkpoints were trained on
LM_HEAD_FORMAT = "int8"
# One quantized weight stream, two graph encodings (docs/export-format.md, "Quantization"): fp32 exports are
# onnxruntime's (MatMulNBits, 0.7 GiB less than ORT's own DQ fusion on E2B); fp16/bf16 exports are TensorRT's
# (standard opset-21 blockwise DequantizeLinear before the Transpose -> MatMul), which ORT runs too (fp16).
GRAPH_NBITS, GRAPH_DQ = "com.microsoft.MatMulNBits", "DequantizeLinear"


def graph_form(dtype: str) -> str:
    return GRAPH_NBITS if dtype == "fp32" else GRAPH_DQ


# Every role a weight can have; `role_of` maps tensor names to them.
LINEAR_ROLES = ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down")
ROLES = (*LINEAR_ROLES, "lm_head", "embed", "ple_table", "ple_proj", "router", "moe_experts")
KEPT_BY_DEFAULT = ("router", "ple_proj", "embed", "ple_table")  # always at the export dtype in this version

LM_HEAD = "lm_head"  # the decoder's name for its quantized copy of the tied embedding
_ROLE_PATTERNS = [
    (re.compile(r"layers\.\d+\.self_attn\.([qkvo])_proj\.weight$"), "attn_{}"),
    (re.compile(r"layers\.\d+\.mlp\.(gate|up|down)_proj\.weight$"), "mlp_{}"),
    (re.compile(r"layers\.\d+\.per_layer_(input_gate|projection)\.weight$"), "ple_proj"),
    (re.compile(r"per_layer_model_projection\.weight$"), "ple_proj"),
    (re.compile(r"layers\.\d+\.router\.proj\.weight$"), "router"),
    (re.compile(r"layers\.\d+\.experts\."), "moe_experts"),
    (re.compile(r"embed_tokens_per_layer\.weight$"), "ple_table"),
]


def role_of(name: str) -> str | None:
    """The role of a decoder weight (our names, no "model." prefix); None for norms, scalars and buffers.
    `embed_tokens.weight` as the decoder uses it is the LM head (the embed graph's gather is `embed`)."""
    if name in ("embed_tokens.weight", LM_HEAD):
        return "lm_head"
    for pattern, role in _ROLE_PATTERNS:
        m = pattern.search(name)
        if m:
            return role.format(*m.groups())
    return None


@dataclass(frozen=True)
class QuantSpec:
    """The quantization of an export, as export.json records it (key "quantization")."""

    format: str  # "int4" | "int8": what --quant asked for
    block_size: int
    roles: dict[str, str]  # role -> "int4" | "int8" | the export dtype (kept)
    scheme: str = SCHEME
    method: str = METHOD
    accuracy_level: int = 0  # MatMulNBits: 0 = activations stay fp32 (exact), 4 = int8 activations (faster)
    tensors: dict[str, str] = field(default_factory=dict)  # checkpoint name -> format, for the quantized ones
    graph: str = GRAPH_NBITS  # the graph encoding (graph_form); scales are stored in the export dtype for DQ

    @property
    def positive_scales(self) -> bool:
        """TensorRT's DequantizeLinear takes positive scales only (quant/rtn.py, quantize_rows)."""
        return self.graph != GRAPH_NBITS

    def format_of(self, name: str) -> str | None:
        """The quantized format of tensor `name`, or None when it stays in the export dtype."""
        return self.tensors.get(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "scheme": self.scheme,
            "method": self.method,
            "block_size": self.block_size,
            "accuracy_level": self.accuracy_level,
            "graph": self.graph,
            "scales": "positive absmax/qmax" if self.positive_scales else "signed absmax/qmin",
            "roles": dict(self.roles),
            "tensors": dict(self.tensors),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        return cls(
            format=d["format"],
            block_size=int(d["block_size"]),
            roles=dict(d["roles"]),
            scheme=d.get("scheme", SCHEME),
            method=d.get("method", METHOD),
            accuracy_level=int(d.get("accuracy_level", 0)),
            tensors=dict(d.get("tensors", {})),
            graph=d.get("graph", GRAPH_NBITS),
        )


@dataclass(frozen=True)
class QuantRequest:
    """What the export command line asked for (`--quant`, `--block-size`, `--quant-keep`, `--accuracy-level`)."""

    format: str = "none"
    block_size: int = DEFAULT_BLOCK
    keep: tuple[str, ...] = ()
    accuracy_level: int = 0

    @property
    def enabled(self) -> bool:
        return self.format != "none"


def quant_refusal(quant: str, dtype: str, has_moe: bool, block_size: int) -> str | None:
    """Why `--quant quant` cannot be exported (one line), or None. Checked before any work."""
    if quant in NOT_YET:
        return f"--quant {quant} is not supported yet (this version writes int4 and int8 weight-only exports)"
    if quant not in BITS:
        return f"unknown --quant {quant!r}; choose one of {', '.join(QUANT_CHOICES)}"
    if block_size not in BLOCK_SIZES:
        return f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size}"
    if has_moe:
        return (
            f"--quant {quant} cannot quantize MoE experts yet; refusing rather than leaving most of this "
            "model's weights in 16 bits (export an MoE preset without --quant)"
        )
    return None


def plan_quant(
    quant: str, block_size: int, keep: tuple[str, ...], names: list[str], dtype: str, accuracy_level: int = 0
) -> QuantSpec:
    """Decide the format of every decoder weight in `names` (ours, no prefix); `keep` are roles left at dtype."""
    unknown = [r for r in keep if r not in ROLES]
    if unknown:
        raise ExportError(f"unknown --quant-keep role {unknown[0]!r}; choose from {', '.join(ROLES)}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ExportError(f"--accuracy-level must be 0..4, got {accuracy_level}")
    kept = set(keep) | set(KEPT_BY_DEFAULT)
    present = {role_of(n) for n in names} | ({"embed"} if "embed_tokens.weight" in names else set())
    roles = {
        r: dtype if r in kept else (LM_HEAD_FORMAT if r == "lm_head" else quant)
        for r in ROLES
        if r in present
    }
    tensors = {}
    for name in names:
        role = role_of(name)
        if role is not None and roles[role] in BITS:
            tensors[LM_HEAD if role == "lm_head" else name] = roles[role]
    return QuantSpec(
        quant, block_size, roles, accuracy_level=accuracy_level, tensors=tensors, graph=graph_form(dtype)
    )
