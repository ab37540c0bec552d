"""What `--quant` does to the bytes, per role, before any work: `inspect --quant` prints it, and the weight
writer lays out codes and scales with the same arithmetic (quantized_nbytes). A pre-quantized checkpoint
(quant/imported.py) is planned as its export keeps it: its packed weights int4 at its group size, the rest float."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ExportError
from .formats import (
    BITS,
    EMBED_ROWS,
    GRAPH_NBITS,
    IMPORTED,
    LM_HEAD,
    ROLES,
    QuantRequest,
    QuantSpec,
    plan_imported,
    plan_quant,
    quant_refusal,
    role_of,
)
from .imported import import_request

if TYPE_CHECKING:
    from ..model.config import Gemma4Spec

_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def scale_bytes(graph: str, fmt: str, dtype: str) -> int:
    """Bytes per block scale: E4M3 for nvfp4, fp32 for MatMulNBits, the export dtype for DequantizeLinear."""
    if fmt == "nvfp4":
        return 1
    return 4 if graph == GRAPH_NBITS else _DTYPE_BYTES[dtype]


def _nbytes(name: str, shape: tuple[int, ...], quant: QuantSpec, dtype: str) -> int:
    """Bytes of tensor `name` as exported: codes + scales when quantized, else at the export dtype."""
    fmt = quant.format_of(name)
    if fmt is None:
        return _DTYPE_BYTES[dtype] * math.prod(shape)
    n, k = math.prod(shape[:-1]), shape[-1]  # MoE experts [E, N, K]: E*N rows
    scale = scale_bytes(quant.graph_of(name), fmt, dtype)
    return sum(quantized_nbytes(n, k, BITS[fmt], quant.block_of(fmt), scale))


def quantized_nbytes(n: int, k: int, bits: int, block: int, scale_size: int) -> tuple[int, int]:
    """(codes, scales) bytes of an [N, K] weight: K padded to whole blocks, one scale per block."""
    blocks = -(-k // block)
    return n * blocks * block * bits // 8, n * blocks * scale_size


@dataclass(frozen=True)
class RoleSize:
    role: str
    format: str  # a quantized format, or the export dtype when kept
    tensors: int
    params: int
    before: int  # bytes at the export dtype (0 for the LM head: unquantized, it is the embedding's table)
    after: int  # bytes as exported (codes + scales, or unchanged)


def role_sizes(shapes: dict[str, tuple[int, ...]], quant: QuantSpec, dtype: str) -> list[RoleSize]:
    """Per role, in ROLES order, for the decoder weights `shapes` (our names). The tied embedding is counted
    once, as the embed graph's table (`embed`); the LM head is a second copy only when quantized."""
    width = _DTYPE_BYTES[dtype]
    acc: dict[str, list[int]] = {}
    for name, shape in shapes.items():
        role = role_of(name)
        if name == "embed_tokens.weight":
            _add(acc, "embed", shape, width, _nbytes(EMBED_ROWS, shape, quant, dtype))
        if role is None or role not in quant.roles:
            continue
        if role == "lm_head":  # its own copy when quantized, or the float table once the embed's is int8
            shared = quant.format_of(LM_HEAD) is None and quant.format_of(EMBED_ROWS) is None
            _add(acc, role, shape, 0, 0 if shared else _nbytes(LM_HEAD, shape, quant, dtype))
            continue
        _add(acc, role, shape, width, _nbytes(name, shape, quant, dtype))
    return [RoleSize(r, quant.roles.get(r, dtype), *acc[r]) for r in ROLES if r in acc]


def _add(acc: dict[str, list[int]], role: str, shape: tuple[int, ...], width: int, after: int) -> None:
    row = acc.setdefault(role, [0, 0, 0, 0])
    params = math.prod(shape)
    for i, v in enumerate((1, params, width * params, after)):
        row[i] += v


@dataclass(frozen=True)
class SizePlan:
    """What an export at `dtype` would quantize (`quant`) and what each role would weigh (`rows`)."""

    quant: QuantSpec
    dtype: str
    rows: list[RoleSize]

    @property
    def title(self) -> str:
        q = self.quant
        form = f"at {self.dtype} ({q.graph}, min sm{q.min_sm or 75})"
        if q.method == IMPORTED:
            return f"method imported: int4 as stored ({q.source}), group size {q.block_size}, {form}"
        return f"--quant {q.format} {form}"


def plan_sizes(
    spec: Gemma4Spec, request: QuantRequest, dtype: str, checkpoint: str | Path | None = None
) -> SizePlan | None:
    """The per-role sizes of exporting `spec` (or the checkpoint `checkpoint`) at `dtype` with `request`, or
    None when the export would quantize nothing. Refuses in one line what export refuses, in the same order
    (ExportError / CheckpointError); a pre-quantized checkpoint implies its own int4 layout."""
    from ..model.weights import (  # torch; and model.weights imports this package
        CheckpointReader,
        PackedEntry,
        checkpoint_quant,
        expected_shapes,
        resolve_text_weights,
    )

    refusal = quant_refusal(request)
    if refusal:
        raise ExportError(refusal)
    imported = checkpoint_quant(checkpoint) if checkpoint is not None else None
    if imported is None:
        if not request.enabled:
            return None
        shapes = expected_shapes(spec)  # builds the model on the meta device: once
        quant = plan_quant(request, sorted(shapes), dtype)
        return SizePlan(quant, dtype, role_sizes(shapes, quant, dtype))
    request = import_request(request, imported)
    entries = resolve_text_weights(
        CheckpointReader(checkpoint), spec, imported
    )  # headers and weight_shape only
    shapes = {name: tuple(e.shape) for name, e in entries.items()}  # a packed weight's is its float (N, K)
    packed = {name for name, e in entries.items() if isinstance(e, PackedEntry)}
    quant = plan_imported(request, sorted(shapes), packed, dtype, imported.source)
    return SizePlan(quant, dtype, role_sizes(shapes, quant, dtype))
