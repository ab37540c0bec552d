"""Pre-quantized checkpoints: compressed-tensors `pack-quantized` int4 (llm-compressor / vLLM), exported as stored.

The layout (compressed-tensors' PackedQuantizationCompressor): each quantized Linear `<name>` has
`<name>.weight_packed` int32 [N, ceil(K/8)], `<name>.weight_scale` [N, K/group] (bf16/fp16/fp32) and
`<name>.weight_shape` [2] = (N, K). A symmetric int4 code q in [-8, 7] is stored as u = q + 8 in 4 bits, eight
per int32, column 8j+i in bits 4i..4i+3 (the lowest nibble holds the lowest column); the weight is q x scale of
its group along K. These are exactly the project's own int4 codes and per-block scales (quant/rtn.py), so the
export writes them through the usual packers with no dequantize / re-round: the block size is the group size.

Everything else (zero points, activation order, other bit widths or strategies, other quant_methods) is refused
in one line that names the format. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CheckpointError, ExportError
from .formats import BLOCK_SIZES, IMPORTED, QuantRequest, describe_quantization

SOURCE = "compressed-tensors pack-quantized"
PACK = 8  # int4 codes per int32
WEIGHT_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")
REFUSED_SUFFIXES = {"weight_zero_point": "zero points", "weight_g_idx": "activation order (g_idx)"}


@dataclass(frozen=True)
class ImportedQuant:
    """A checkpoint's quantization the export keeps as is."""

    source: str  # the format, as the manifest and messages name it
    group_size: int  # values per scale along K: the export's block size


def quantization_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """config.json's `quantization_config` (top level or in text_config), or None."""
    qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    return qc or None


def parse_import(config: dict[str, Any]) -> ImportedQuant | None:
    """The quantization of a checkpoint's config.json that the export can keep, None for a float checkpoint;
    a CheckpointError (one line naming the format) for one it cannot read."""
    qc = quantization_config(config)
    if qc is None:
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        raise CheckpointError(
            f"the checkpoint is already quantized (quantization_config: {describe_quantization(qc)}); "
            f"this version imports {SOURCE} int4 only: export its unquantized original (add --quant to "
            "quantize it here)"
        )
    where = f"quantization_config ({SOURCE})"
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{where}: no config_groups")
    sizes = {_group_size(name, group, qc.get("format"), where) for name, group in groups.items()}
    if len(sizes) > 1:
        raise CheckpointError(
            f"{where}: config groups with different group sizes {sorted(sizes)} are not supported"
        )
    if qc.get("kv_cache_scheme"):
        raise CheckpointError(f"{where}: a quantized KV cache (kv_cache_scheme) is not supported")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise CheckpointError(
            f"{where}: quantization_status {status!r}; only 'compressed' checkpoints are read"
        )
    return ImportedQuant(SOURCE, sizes.pop())


def _group_size(name: str, group: Any, top_format: Any, where: str) -> int:
    """One config group's weights: symmetric int4 in groups of 32/64/128 along K, weight-only."""
    if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
        raise CheckpointError(f"{where}: config group {name!r} has no weights scheme")
    fmt = group.get("format") or top_format
    if fmt != "pack-quantized":
        raise CheckpointError(
            f"{where}: config group {name!r} has format {fmt!r}; only 'pack-quantized' is read"
        )
    for kind in ("input_activations", "output_activations"):
        if group.get(kind):
            raise CheckpointError(
                f"{where}: config group {name!r} quantizes {kind} (weight-only is supported)"
            )
    w = group["weights"]
    size = w.get("group_size")
    strategy = w.get("strategy") or ("group" if isinstance(size, int) and size > 0 else "channel/tensor")
    problems = [
        (w.get("num_bits") != 4, f"num_bits={w.get('num_bits')} (4 is supported)"),
        (str(w.get("type", "int")).lower() != "int", f"type={w.get('type')} (int is supported)"),
        (w.get("symmetric", True) is not True, "asymmetric weights (zero points; symmetric is supported)"),
        (w.get("actorder") not in (None, False), f"actorder={w.get('actorder')} (activation order)"),
        (w.get("dynamic") not in (None, False), "dynamic weights"),
        (strategy != "group", f"strategy={strategy} (group is supported)"),
        (strategy == "group" and size not in BLOCK_SIZES, f"group_size={size} (32, 64 or 128 supported)"),
    ]
    bad = next((why for cond, why in problems if cond), None)
    if bad:
        raise CheckpointError(f"{where}: config group {name!r}: {bad}")
    return int(size)


def import_request(request: QuantRequest | None, imported: ImportedQuant) -> QuantRequest:
    """The export's quantization for an imported checkpoint: `--quant` omitted or int4 at the group size implies
    int4 of exactly the stored codes; anything else would re-round them (ExportError, one line)."""
    request = request or QuantRequest()
    named = f"the checkpoint is already int4 ({imported.source}, group size {imported.group_size})"
    if request.format not in ("none", "int4"):
        raise ExportError(f"{named}; --quant {request.format} would re-round it: omit --quant or pass int4")
    if request.block_size not in (None, imported.group_size):
        raise ExportError(f"{named}; --block-size {request.block_size} would re-round it: omit it")
    if request.keep or request.overrides or request.method not in ("rtn", IMPORTED):
        raise ExportError(
            f"{named}; --quant-keep, --quant-override and --quant-method do not apply: its packed weights are "
            "exported as stored and the rest stays float"
        )
    return QuantRequest("int4", imported.group_size, accuracy_level=request.accuracy_level, method=IMPORTED)


def unpack_int4(packed: np.ndarray, k: int) -> np.ndarray:
    """int32 [N, ceil(K/8)] -> signed codes int8 [N, K] (column 8j+i in bits 4i..4i+3 of word j, minus 8)."""
    words = np.ascontiguousarray(packed, dtype="<i4").view("<u4")
    shifts = (4 * np.arange(PACK, dtype=np.uint32))[None, None, :]
    nibbles = (words[:, :, None] >> shifts) & 0xF  # [N, words, 8]: the lowest column in the lowest nibble
    return (nibbles.reshape(words.shape[0], -1)[:, :k].astype(np.int16) - 8).astype(np.int8)


def blocked(codes: np.ndarray, group: int) -> np.ndarray:
    """codes [N, K] -> [N, blocks, group], K padded with zero codes to whole blocks (as quant/rtn.py lays out)."""
    n, k = codes.shape
    blocks = -(-k // group)
    out = np.zeros((n, blocks * group), dtype=np.int8)
    out[:, :k] = codes
    return out.reshape(n, blocks, group)


def dequantize_imported(codes: np.ndarray, scales: np.ndarray, group: int) -> np.ndarray:
    """codes int8 [N, K] x scales float32 [N, blocks] -> float32 [N, K]: the checkpoint's own weight."""
    k = codes.shape[1]
    deq = blocked(codes, group).astype(np.float32) * scales.astype(np.float32)[..., None]
    return deq.reshape(codes.shape[0], -1)[:, :k]


__all__ = [
    "SOURCE",
    "ImportedQuant",
    "blocked",
    "dequantize_imported",
    "import_request",
    "parse_import",
    "quantization_config",
    "unpack_int4",
]
