"""What `export --quant` means: formats, roles, which tensor gets which format, and the manifest record.

Pure Python (no torch, no numpy): the CLI, the manifest and the exporter read these tables.

Defaults (docs/export-format.md, "Quantization"): attention q/k/v/o and MLP gate/up/down take `--quant`; the
LM head (the tied embedding used as a GEMM) takes int8, because peers found Gemma's tied head the most sensitive
linear (docs/export-format.md, "Quantization", the role table); norms, the router and the PLE projections stay in the export dtype
(tiny, and quantizing them costs far more accuracy than it saves bytes). The token embedding and the PLE table
are gathers, not MatMuls: they take int8 rows (one scale per block of each row, ROW_FORMATS), which the embed graph
gathers and dequantizes row by row (passes/quantize_gather.py) and which onnxruntime reads from the data file by
row (runners/rows.py), so the 4.4 GiB PLE table of E2B is never loaded whole. MoE experts take `--quant` per expert:
their [E, N, K] tensors are blocked along K like any weight. The TensorRT form dequantizes them with one
DequantizeLinear (axis 2) before the MoE op; the onnxruntime form runs each expert's two MatMulNBits in an
`If` of its own (passes/moe_nbits.py), reading views of the same stacked codes.

fp8 and nvfp4 are TensorRT formats (DequantizeLinear of FLOAT8E4M3FN / FLOAT4E2M1 codes, quant/floats.py): an
export that uses them takes the DequantizeLinear form whatever its dtype, and its engines need the SM that has
the type (MIN_SM).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ExportError

SCHEME, METHOD = "symmetric", "rtn"  # signed codes, no zero point; round-to-nearest absmax per block
# rtn: the absmax scale; mse: per block, the scale (absmax x 0.7..1.0) whose codes have the least squared error
# (quant/rtn.py). Both calibration-free, both symmetric, so both serve onnxruntime and TensorRT.
METHODS = ("rtn", "mse")
IMPORTED = (
    "imported"  # the codes and scales of a pre-quantized checkpoint, written as stored (quant/imported.py)
)
BITS = {"int4": 4, "int8": 8, "fp8": 8, "nvfp4": 4}  # the formats this version writes, bits per code
INT_FORMATS, FLOAT_FORMATS = ("int4", "int8"), ("fp8", "nvfp4")
QUANT_CHOICES = ("none", *BITS)
BLOCK_SIZES = (32, 64, 128)
NVFP4_BLOCK = 16  # fixed by the format: E4M3 block scales per 16 values
# int4/int8: ggml Q4_0 / ORT-GenAI default, the grid Google's QAT checkpoints were trained on; fp8: the
# 128-block of DeepSeek/TensorRT-LLM FP8_BLOCK_SCALES (one scale per 128 values costs 0.2 % of the weights)
DEFAULT_BLOCK = {"int4": 32, "int8": 32, "fp8": 128, "nvfp4": NVFP4_BLOCK}
MIN_SM = {"fp8": 89, "nvfp4": 120}  # TensorRT-RTX: FP8 from Ada, FP4 from Blackwell (others: any target)
LM_HEAD_FORMAT = "int8"
ROW_ROLES, ROW_FORMATS = ("embed", "ple_table"), ("int8",)  # gathered tables: int8 rows, whatever --quant is
# One quantized weight stream, two graph encodings (docs/export-format.md, "Quantization"): fp32 exports are
# onnxruntime's (MatMulNBits, 0.7 GiB less than ORT's own DQ fusion on E2B); fp16/bf16 exports are TensorRT's
# (standard opset-21 blockwise DequantizeLinear before the Transpose -> MatMul), which ORT runs too (fp16).
GRAPH_NBITS, GRAPH_DQ = "com.microsoft.MatMulNBits", "DequantizeLinear"


def graph_form(dtype: str, formats: set[str] | frozenset[str] = frozenset()) -> str:
    """MatMulNBits for fp32 exports whose quantized weights are all integer; DequantizeLinear otherwise (float
    formats, half precision)."""
    nbits = dtype == "fp32" and set(formats) <= set(INT_FORMATS)
    return GRAPH_NBITS if nbits else GRAPH_DQ


def splits_int8(graph: str, fmt: str, accuracy_level: int) -> bool:
    """Whether an 8-bit MatMulNBits weight is stored as two 4-bit halves: onnxruntime (1.31) has no fp32-activation
    kernel for 8 bits and dequantizes the whole matrix per call (4.4 ms for an [8192, 512] LM head vs 0.17 ms at
    4 bits, benchmarks/RESULTS.md); with int8 activations (level 4) its 8-bit kernel is fast and is kept."""
    return graph == GRAPH_NBITS and fmt == "int8" and accuracy_level < 4


# Every role a weight can have; `role_of` maps tensor names to them.
LINEAR_ROLES = ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down")
ROLES = (*LINEAR_ROLES, "lm_head", "embed", "ple_table", "ple_proj", "router", "moe_experts")
KEPT_BY_DEFAULT = ("router", "ple_proj")  # at the export dtype unless overridden (ple_proj) or never (router)

LM_HEAD = "lm_head"  # the decoder's name for its quantized copy of the tied embedding
EMBED_ROWS = "embed_rows"  # the embed graph's name for its quantized copy of the tied embedding
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
    if name == EMBED_ROWS:
        return "embed"
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
    source: str | None = None  # method "imported": the checkpoint's format (quant/imported.py)
    folded: dict[str, str] = field(default_factory=dict)  # experts' down weight -> the per_expert_scale in it

    @property
    def positive_scales(self) -> bool:
        """TensorRT's DequantizeLinear takes positive scales only (quant/rtn.py, quantize_rows)."""
        return self.graph != GRAPH_NBITS

    @property
    def formats(self) -> set[str]:
        """The formats the export's tensors use (with overrides, more than `format`)."""
        return set(self.tensors.values())

    @property
    def min_sm(self) -> int:
        """The oldest SM whose TensorRT has every format used (0: any)."""
        return max((MIN_SM.get(f, 0) for f in self.formats), default=0)

    def block_of(self, fmt: str) -> int:
        """nvfp4's block is fixed; every other format uses the export's block size."""
        return NVFP4_BLOCK if fmt == "nvfp4" else self.block_size

    def scales_text(self) -> str:
        if self.method == IMPORTED:
            return f"as stored by the checkpoint ({self.source})"
        rows = "; gathered rows: positive, int8: absmax/127" if self.row_tables else ""
        if not self.positive_scales:
            return "signed absmax/qmin" + rows
        rules = {"int4": "absmax/7", "int8": "absmax/127", "fp8": "absmax/448"}
        text = [f"{f}: {rules[f]}" for f in sorted(self.formats) if f in rules]
        if "nvfp4" in self.formats:
            text.append("nvfp4: e4m3 absmax/6 per 16 x global absmax/2688")
        return "positive, " + "; ".join(text)

    def graph_of(self, name: str) -> str:
        """The encoding of tensor `name`: gathered tables are DequantizeLinear-style rows (signed codes, scales in
        the export dtype) in every export; MatMul weights follow the export's `graph`."""
        return GRAPH_DQ if name in self.row_tables else self.graph

    @property
    def row_tables(self) -> list[str]:
        """The quantized tensors the embed graph gathers by row (passes/quantize_gather.py)."""
        return [n for n in self.tensors if role_of(n) in ROW_ROLES]

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
            "scales": self.scales_text(),
            "roles": dict(self.roles),
            "tensors": dict(self.tensors),
            **({"source": self.source} if self.source else {}),
            **({"folded": dict(self.folded)} if self.folded else {}),
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
            source=d.get("source"),
            folded=dict(d.get("folded", {})),
        )


@dataclass(frozen=True)
class QuantRequest:
    """What the export command line asked for (`--quant`, `--block-size`, `--quant-keep`, `--quant-override`,
    `--accuracy-level`). `block_size` None: the format's default (DEFAULT_BLOCK)."""

    format: str = "none"
    block_size: int | None = None
    keep: tuple[str, ...] = ()
    accuracy_level: int = 0
    overrides: tuple[tuple[str, str], ...] = ()  # (role, format), in command-line order
    method: str = METHOD  # METHODS; the float formats have one rule each (quant/floats.py)

    @property
    def enabled(self) -> bool:
        return self.format != "none"


# the MatMul weights and the gathered tables; the router stays in the export dtype (module docstring)
OVERRIDABLE = (*LINEAR_ROLES, "lm_head", "moe_experts", "ple_proj", *ROW_ROLES)


def parse_override(text: str) -> tuple[str, str]:
    """'ROLE=FORMAT' -> (role, format), or ExportError naming what is wrong."""
    role, sep, fmt = text.partition("=")
    if not sep:
        raise ExportError(f"--quant-override {text!r} is not ROLE=FORMAT")
    if role not in OVERRIDABLE:
        why = "unknown role" if role not in ROLES else "this role cannot be quantized in this version"
        raise ExportError(f"--quant-override {text}: {why}; choose from {', '.join(OVERRIDABLE)}")
    if fmt not in BITS:
        raise ExportError(f"--quant-override {text}: unknown format; choose one of {', '.join(BITS)}")
    if role in ROW_ROLES and fmt not in ROW_FORMATS:
        raise ExportError(
            f"--quant-override {text}: {role} is a gathered table, stored as {'/'.join(ROW_FORMATS)} rows only"
        )
    return role, fmt


def quant_refusal(request: QuantRequest) -> str | None:
    """Why `request` cannot be exported (one line), or None. Checked before any work."""
    quant, block = request.format, request.block_size
    if quant not in BITS:
        if quant == "none" and not request.overrides:
            return None
        return f"unknown --quant {quant!r}; choose one of {', '.join(QUANT_CHOICES)}"
    formats = {quant, *(f for _, f in request.overrides)}
    if request.method not in (*METHODS, IMPORTED):
        return f"unknown --quant-method {request.method!r}; choose one of {', '.join(METHODS)}"
    if request.method != METHOD and not formats & set(INT_FORMATS):
        return f"--quant-method {request.method} applies to int4/int8 weights; {quant} has its own rounding"
    if block is not None and block not in BLOCK_SIZES:
        return f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block}"
    if block is not None and formats == {"nvfp4"}:
        return (
            f"--block-size does not apply to nvfp4 (its blocks are {NVFP4_BLOCK} values, fixed by the format)"
        )
    return None


def _block_size(request: QuantRequest, formats: set[str]) -> int:
    """The block of every format but nvfp4 (whose block is fixed)."""
    if request.block_size is not None:
        return request.block_size
    base = DEFAULT_BLOCK[request.format]
    return DEFAULT_BLOCK["int4"] if base == NVFP4_BLOCK and formats - {"nvfp4"} else base


def plan_quant(request: QuantRequest, names: list[str], dtype: str) -> QuantSpec:
    """Decide the format of every decoder weight in `names` (ours, no prefix) for `request` at `dtype`."""
    unknown = [r for r in request.keep if r not in ROLES]
    if unknown:
        raise ExportError(f"unknown --quant-keep role {unknown[0]!r}; choose from {', '.join(ROLES)}")
    if request.accuracy_level not in (0, 1, 2, 3, 4):
        raise ExportError(f"--accuracy-level must be 0..4, got {request.accuracy_level}")
    overrides = dict(request.overrides)
    clash = sorted(set(overrides) & set(request.keep))
    if clash:
        raise ExportError(f"role {clash[0]} is both kept (--quant-keep) and overridden (--quant-override)")
    kept = set(request.keep) | set(KEPT_BY_DEFAULT)
    present = {role_of(n) for n in names} | ({"embed"} if "embed_tokens.weight" in names else set())

    def format_of(role: str) -> str:
        if role in overrides:
            return overrides[role]
        if role in kept or not request.enabled:
            return dtype
        if role in ROW_ROLES:
            return ROW_FORMATS[0]
        return LM_HEAD_FORMAT if role == "lm_head" else request.format

    roles = {r: format_of(r) for r in ROLES if r in present}
    tensors = {}
    for name in names:
        role = role_of(name)
        if role is not None and roles[role] in BITS:
            tensors[LM_HEAD if role == "lm_head" else name] = roles[role]
    if roles.get("embed") in BITS:  # the tied embedding's second copy, gathered by the embed graph
        tensors[EMBED_ROWS] = roles["embed"]
    formats = {f for n, f in tensors.items() if role_of(n) not in ROW_ROLES}  # the decoder's MatMul weights
    return QuantSpec(
        request.format,
        _block_size(request, set(tensors.values())),
        roles,
        accuracy_level=request.accuracy_level,
        tensors=tensors,
        graph=graph_form(dtype, formats),
        method=request.method,
        folded=expert_scale_folds(tensors, set(names)),
    )


_EXPERTS_DOWN = re.compile(r"^(.*layers\.\d+\.)experts\.down_proj$")


def expert_scale_folds(tensors: dict[str, str], names: set[str]) -> dict[str, str]:
    """Quantized experts' down weight -> the router's per_expert_scale it absorbs.

    The scale multiplies each expert's output, a linear function of its down weights, so it moves into them
    before rounding and the graph reads ones. For the absmax-relative formats (int4, int8, fp8) the codes stay
    what they were and only the stored scales carry the factor, rounded once as any scale is; the fake-quant
    reference folds the same way (quant/reference.py)."""
    folds = {}
    for name in tensors:
        m = _EXPERTS_DOWN.match(name)
        if m and f"{m[1]}router.per_expert_scale" in names:
            folds[name] = f"{m[1]}router.per_expert_scale"
    return folds


def describe_quantization(qc: Any) -> str:
    """A checkpoint's `quantization_config` in one line: its naming keys, for refusals."""
    keys = ("quant_method", "format", "bits", "group_size", "quant_algo")
    return ", ".join(f"{k}={qc[k]}" for k in keys if isinstance(qc, dict) and k in qc) or "unrecognized"


def plan_imported(
    request: QuantRequest, names: list[str], imported: set[str], dtype: str, source: str
) -> QuantSpec:
    """The quantization of a pre-quantized checkpoint: exactly the `imported` tensors (ours) are int4 at the
    checkpoint's group size (`request.block_size`); every other weight stays in the export dtype."""
    outside = sorted(n for n in imported if role_of(n) not in LINEAR_ROLES)
    if outside:
        raise ExportError(
            f"{source}: '{outside[0]}' is packed, but only attention q/k/v/o and MLP gate/up/down weights can "
            "be imported in this version"
        )
    present = {role_of(n) for n in names} - {None}
    packed = {role_of(n) for n in imported}
    roles = {r: "int4" if r in packed else dtype for r in ROLES if r in present}
    return QuantSpec(
        "int4",
        request.block_size,
        roles,
        method=IMPORTED,
        accuracy_level=request.accuracy_level,
        tensors={n: "int4" for n in sorted(imported)},
        graph=graph_form(dtype, {"int4"}),
        source=source,
    )
