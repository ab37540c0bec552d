"""Stream checkpoint tensors into one external-data file shared by both graphs, one chunk at a time.

Peak memory is one chunk, not one model: tensors are read with plain reads (mapped pages would count against
RSS), converted to the export dtype chunk by chunk and appended. The tied embedding is written once and
referenced by the embed graph (gather) and the decoder (LM head).

With `--quant`, a quantized tensor is written as its codes and then its scales (quant/encode.py), row chunk by
row chunk, instead of its float bytes (MatMulNBits codes and fp32 scales for an fp32 integer export; for
DequantizeLinear, ONNX INT4/INT8/FLOAT8E4M3FN/FLOAT4E2M1 codes and scales in the export dtype, E4M3 for nvfp4,
whose tensor-wide scale takes one more read of the tensor); the scales go to a spill file until the codes
end, so memory holds one chunk. The tied embedding's quantized copies are separate tensors: `lm_head` (the
decoder's MatMul weights) and `embed_rows` (the embed graph's int8 rows).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from ..dtypes import DType
from ..errors import ExportError
from ..memory import map_large_allocations
from ..model.weights import PackedEntry, TensorEntry, check_finite
from ..passes.quantize_matmul import DQWeight, NBitsWeight
from ..quant.encode import encode_rows, global_scale
from ..quant.formats import BITS, GRAPH_NBITS, IMPORTED, QuantSpec, splits_int8
from ..quant.imported import blocked, unpack_int4
from ..quant.rtn import num_blocks, pack_matmulnbits, pack_signed
from ..quant.sizes import quantized_nbytes

DATA_FILE = "weights.data"
ALIGN = 64
CHUNK_BYTES = (
    16 << 20
)  # per read while streaming (full-size E2B with towers: 64 MiB chunks peaked at 1.25 GiB)
QUANT_CHUNK_BYTES = 16 << 20  # float32 rows per quantized chunk: the encoder makes several temporaries of it


@dataclass(frozen=True)
class Placed:
    offset: int
    length: int


@dataclass(frozen=True)
class QuantPlaced:
    """A quantized tensor in the data file: codes [N, blocks, blob] then scales [N, blocks] (`graph` says which
    encoding: MatMulNBits with fp32 scales, or DequantizeLinear with scales in the export dtype)."""

    codes: Placed
    scales: Placed
    bits: int
    block_size: int
    n: int
    k: int
    graph: str
    scale_dtype: torch.dtype
    fmt: str
    global_scale: float | None = None  # nvfp4: the tensor-wide scale (in the export dtype)
    method: str = "rtn"  # the integer formats' scale rule (quant/rtn.py)
    lead: tuple[int, ...] = ()  # the tensor's dims before K: (N,) or, for MoE experts, (E, N)
    split: bool = False  # 8-bit MatMulNBits codes as two 4-bit rows each (formats.splits_int8)

    @property
    def blocks(self) -> int:
        return num_blocks(self.k, self.block_size)


def _write_converted(src: TensorEntry, dst, dtype: torch.dtype) -> int:
    """Append `src` converted to `dtype`; returns bytes written. One reused read buffer: with the finiteness
    check's temporaries (~2.5x a chunk) it is what the writer adds to the export's peak RSS."""
    in_size = torch.empty((), dtype=src.dtype).element_size()
    step = max(in_size, CHUNK_BYTES // in_size * in_size)
    buf = memoryview(bytearray(min(step, src.nbytes)))
    written = 0
    with open(src.file, "rb") as f:
        f.seek(src.offset)
        remaining = src.nbytes
        while remaining:
            raw = buf[: min(step, remaining)]
            if f.readinto(raw) != len(raw):
                raise ExportError(f"{src.file.name}: truncated while reading tensor '{src.key}'")
            remaining -= len(raw)
            chunk = torch.frombuffer(raw, dtype=src.dtype)
            check_finite(src, chunk)
            if src.dtype == dtype:
                data = raw
            else:
                converted = chunk.to(dtype)
                if not bool(torch.isfinite(converted).all()):
                    raise ExportError(
                        f"tensor '{src.key}' overflows {DType.parse(dtype).value}; export in fp32 or bf16"
                    )
                data = converted.view(torch.uint8).numpy().tobytes()
            dst.write(data)
            written += len(data)
    return written


def _read_rows(src: TensorEntry, rows: int, dtype: torch.dtype = torch.float32):
    """Yield `dtype` row chunks [rows, K] of a tensor [..., K] (its rows in order), read with plain reads."""
    n, k = int(np.prod(src.shape[:-1])), src.shape[-1]
    in_size = torch.empty((), dtype=src.dtype).element_size()
    with open(src.file, "rb") as f:
        f.seek(src.offset)
        for start in range(0, n, rows):
            want = min(rows, n - start) * k * in_size
            raw = f.read(want)
            if len(raw) != want:
                raise ExportError(f"{src.file.name}: truncated while reading tensor '{src.key}'")
            chunk = torch.frombuffer(bytearray(raw), dtype=src.dtype).reshape(-1, k)
            check_finite(src, chunk)
            yield chunk.to(dtype).numpy()


def _chunk_rows(src: TensorEntry) -> int:
    return max(1, QUANT_CHUNK_BYTES // (src.shape[-1] * 4))


def _scaled_rows(src: TensorEntry, expert_scale: np.ndarray | None):
    """fp32 row chunks of `src`; with `expert_scale` [E] (a folded per_expert_scale), experts [E, N, K] have
    each row times its expert's factor."""
    start = 0
    for w in _read_rows(src, _chunk_rows(src)):
        if expert_scale is not None:
            w = w * expert_scale[np.arange(start, start + len(w)) // src.shape[1], None]
        start += len(w)
        yield w


def _absmax(src: TensorEntry, expert_scale: np.ndarray | None = None) -> float:
    return max((float(np.abs(w).max(initial=0.0)) for w in _scaled_rows(src, expert_scale)), default=0.0)


def _expert_scales(entries: dict[str, TensorEntry], quant: QuantSpec | None) -> dict[str, np.ndarray]:
    """Experts' down weight -> the per_expert_scale [E] folded into it (QuantSpec.folded), read once."""
    if quant is None:
        return {}
    return {down: next(_read_rows(entries[scale], 1)).reshape(-1) for down, scale in quant.folded.items()}


def _write_quantized(
    src: TensorEntry, dst, q: QuantPlaced, spill, expert_scale: np.ndarray | None = None
) -> int:
    """Append the codes of `src` (experts times `expert_scale`, if given) chunk by chunk, and its scales as stored to
    the file `spill` (E2B's PLE table has 147 MB of fp32 scales: held in memory they would be a third of the
    export's bound); returns the bytes of codes written."""
    written = 0
    for w in _scaled_rows(src, expert_scale):
        data, s = encode_rows(q.fmt, w, q.block_size, q.graph, q.global_scale, q.method, q.split)
        dst.write(data)
        written += len(data)
        spill.write(torch.from_numpy(s).to(q.scale_dtype).view(torch.uint8).numpy().tobytes())
    return written


def _read_packed(src: PackedEntry, rows: int):
    """Yield (codes int8 [rows, K], scales float32 [rows, blocks]) row chunks of a pre-quantized weight."""
    codes, scales = _read_rows(src.packed, rows, torch.int32), _read_rows(src.scale, rows)
    for packed, s in zip(codes, scales, strict=True):
        yield unpack_int4(packed, src.shape[1]), s


def _write_imported(src: PackedEntry, dst, q: QuantPlaced, spill) -> int:
    """Append a pre-quantized weight's own codes, repacked for the graph (MatMulNBits: q + 8; DequantizeLinear:
    signed INT4), and its scales to `spill`, converted to the graph's scale dtype: never re-rounded."""
    written = 0
    for codes, s in _read_packed(src, _chunk_rows(src)):
        c = blocked(codes, q.block_size)
        data = (pack_matmulnbits(c, 4) if q.graph == GRAPH_NBITS else pack_signed(c, 4)).tobytes()
        scales = torch.from_numpy(s).to(q.scale_dtype)
        if q.graph != GRAPH_NBITS and not bool((scales > 0).all()):  # TensorRT's DequantizeLinear
            raise ExportError(
                f"{src.source}: '{src.key}' has a scale <= 0 (or below {DType.parse(q.scale_dtype).value}'s "
                "range); the DequantizeLinear form needs positive scales: export with --dtype fp32"
            )
        dst.write(data)
        written += len(data)
        spill.write(scales.view(torch.uint8).numpy().tobytes())
    return written


def _scale_dtype(graph: str, fmt: str, dtype: torch.dtype) -> torch.dtype:
    if fmt == "nvfp4":
        return torch.float8_e4m3fn
    return torch.float32 if graph == GRAPH_NBITS else dtype


def _quant_layout(
    name: str,
    entry: TensorEntry,
    quant: QuantSpec,
    dtype: torch.dtype,
    offset: int,
    read: bool,
    expert_scale: np.ndarray | None = None,
) -> QuantPlaced:
    """Where the codes and scales of tensor `name` go when the codes start at `offset` (scales follow, aligned).
    `read`: read the tensor (times `expert_scale`) for nvfp4's global scale (a graph-only export stores 1.0)."""
    if len(entry.shape) not in (2, 3):
        raise ExportError(
            f"cannot quantize '{entry.key}': expected a 2-D weight or 3-D experts, got shape {list(entry.shape)}"
        )
    n, k = int(np.prod(entry.shape[:-1])), entry.shape[-1]  # experts [E, N, K]: E*N rows
    fmt, graph = quant.format_of(name), quant.graph_of(name)
    bits, block_size = BITS[fmt], quant.block_of(fmt)
    if isinstance(entry, PackedEntry) != (quant.method == IMPORTED) or (
        isinstance(entry, PackedEntry) and (fmt, block_size) != ("int4", entry.group_size)
    ):
        raise ExportError(f"'{entry.key}' cannot be both imported and re-quantized ({quant.method}, {fmt})")
    scale_dtype = _scale_dtype(graph, fmt, dtype)
    code_bytes, scale_bytes = quantized_nbytes(n, k, bits, block_size, scale_dtype.itemsize)
    codes = Placed(offset, code_bytes)
    end = codes.offset + codes.length
    scales = Placed(end + (-end % ALIGN), scale_bytes)
    g = None
    if fmt == "nvfp4":
        g = global_scale(_absmax(entry, expert_scale), DType.parse(dtype).value) if read else 1.0
    lead = tuple(entry.shape[:-1])
    split = splits_int8(graph, fmt, quant.accuracy_level)
    return QuantPlaced(
        codes, scales, bits, block_size, n, k, graph, scale_dtype, fmt, g, quant.method, lead, split
    )


def write_weight_file(
    out_dir: Path,
    entries: dict[str, TensorEntry],
    dtype: torch.dtype,
    write_data: bool = True,
    quant: QuantSpec | None = None,
) -> dict[str, Placed | QuantPlaced]:
    """Lay out (and, with write_data, write) every tensor in name order; returns name -> placement.
    Tensors `quant` names are written quantized (codes, then scales)."""
    placed: dict[str, Placed | QuantPlaced] = {}
    if write_data:  # the read buffers and the finiteness check's temporaries go back to the system when freed
        map_large_allocations(128 << 10)
    itemsize = torch.empty((), dtype=dtype).element_size()
    offset = 0
    expert_scales = _expert_scales(entries, quant) if write_data else {}
    folded = set(quant.folded.values()) if quant is not None else set()

    def pad_to(target: int, dst) -> None:
        if dst is not None and target > offset:
            dst.write(b"\0" * (target - offset))

    try:
        with open(out_dir / DATA_FILE, "wb") if write_data else contextlib.nullcontext() as dst:
            for name in sorted(entries):
                entry = entries[name]
                start = offset + (-offset % ALIGN)
                pad_to(start, dst)
                fmt = quant.format_of(name) if quant is not None else None
                if fmt is not None:
                    expert_scale = expert_scales.get(name)
                    q = _quant_layout(name, entry, quant, dtype, start, dst is not None, expert_scale)
                    if dst is not None:
                        with tempfile.TemporaryFile(dir=out_dir) as spill:
                            if isinstance(entry, PackedEntry):
                                written = _write_imported(entry, dst, q, spill)
                            else:
                                written = _write_quantized(entry, dst, q, spill, expert_scale)
                            offset = start + written
                            pad_to(q.scales.offset, dst)
                            scales = spill.tell()
                            spill.seek(0)
                            shutil.copyfileobj(spill, dst, CHUNK_BYTES)
                        if written != q.codes.length or scales != q.scales.length:
                            raise ExportError(f"tensor '{entry.key}' did not quantize to its layout")
                    placed[name] = q
                    offset = q.scales.offset + q.scales.length
                    continue
                if isinstance(entry, PackedEntry):
                    raise ExportError(
                        f"'{entry.key}' is packed ({entry.source}) but the export would store it float"
                    )
                length = int(np.prod(entry.shape, dtype=np.int64)) * itemsize
                if dst is not None and name in folded:  # now inside the experts' down weights
                    dst.write(torch.ones(entry.shape, dtype=dtype).view(torch.uint8).numpy().tobytes())
                elif dst is not None and _write_converted(entry, dst, dtype) != length:
                    raise ExportError(f"tensor '{entry.key}' did not convert to {length} bytes")
                placed[name] = Placed(start, length)
                offset = start + length
    except OSError as e:
        raise ExportError(f"cannot write {DATA_FILE}: {e.strerror or e}") from None
    return placed


def attach_weights(
    model: ir.Model,
    names: dict[str, str],
    placed: dict[str, Placed],
    dtype: torch.dtype,
    out_dir: Path,
    computed: dict[str, torch.Tensor],
) -> None:
    """Point each initializer at its bytes in the data file (or embed a small computed buffer)."""
    for init_name, value in model.graph.initializers.items():
        name = names.get(init_name, init_name)
        if name in computed:
            value.const_value = ir.tensor(computed[name].numpy(), name=init_name)
            continue
        if isinstance(placed.get(name), QuantPlaced):
            continue  # the quantize pass replaces it (quantized_weights)
        if name not in placed:
            raw = getattr(value.const_value, "raw", None)
            if isinstance(raw, torch.Tensor) and raw.device.type != "meta":
                continue  # a constant the exporter lifted with its value (e.g. the embedding scale)
            raise ExportError(f"graph initializer '{init_name}' has no checkpoint tensor")
        p = placed[name]
        value.const_value = ir.ExternalTensor(
            DATA_FILE,
            p.offset,
            p.length,
            ir.DataType(DType.parse(dtype).onnx_elem_type),
            shape=value.shape,
            name=init_name,
            base_dir=out_dir,
        )


def _external(init_name: str, suffix: str, p: Placed, dtype: ir.DataType, shape, out_dir: Path):
    return ir.ExternalTensor(
        DATA_FILE,
        p.offset,
        p.length,
        dtype,
        shape=ir.Shape(shape),
        name=f"{init_name}_{suffix}",
        base_dir=out_dir,
    )


def quantized_weights(
    model: ir.Model,
    names: dict[str, str],
    placed: dict[str, Placed | QuantPlaced],
    out_dir: Path,
    accuracy_level: int,
    dtype: torch.dtype,
) -> dict[str, NBitsWeight | DQWeight]:
    """initializer name -> its quantized form in the data file, for every quantized initializer of `model`."""
    out: dict[str, NBitsWeight | DQWeight] = {}
    for init_name in model.graph.initializers:
        q = placed.get(names.get(init_name, init_name))
        if not isinstance(q, QuantPlaced):
            continue
        if q.graph != GRAPH_NBITS:
            out[init_name] = _dq_weight(init_name, q, out_dir, dtype)
            continue
        # MoE experts are [E, N, ...]: one MatMulNBits weight per expert; split 8 bits: two 4-bit rows per row
        rows = (*q.lead, q.blocks, q.block_size * q.bits // 8)
        if q.split:
            rows = (*q.lead[:-1], 2 * q.lead[-1], q.blocks, q.block_size // 2)
        out[init_name] = NBitsWeight(
            _external(init_name, f"Q{q.bits}", q.codes, ir.DataType.UINT8, rows, out_dir),
            _external(init_name, "scales", q.scales, ir.DataType.FLOAT, (*q.lead, q.blocks), out_dir),
            k=q.k,
            n=q.lead[-1],
            bits=q.bits,
            block_size=q.block_size,
            accuracy_level=accuracy_level,
            split=q.split,
        )
    return out


_CODE_TYPES = {
    "int4": ir.DataType.INT4,
    "int8": ir.DataType.INT8,
    "fp8": ir.DataType.FLOAT8E4M3FN,
    "nvfp4": ir.DataType.FLOAT4E2M1,
}


def _dq_weight(init_name: str, q: QuantPlaced, out_dir: Path, dtype: torch.dtype) -> DQWeight:
    code_type = _CODE_TYPES[q.fmt]
    if q.fmt == "nvfp4":
        scale_type = ir.DataType.FLOAT8E4M3FN
        g = np.array(q.global_scale, dtype=np.float32)
        g_dtype = DType.parse(dtype)
        glob = ir.tensor(torch.from_numpy(g).to(g_dtype.torch), name=f"{init_name}_global_scale")
    else:
        scale_type, glob = ir.DataType(DType.parse(q.scale_dtype).onnx_elem_type), None
    return DQWeight(
        _external(init_name, f"Q{q.bits}", q.codes, code_type, (*q.lead, q.blocks * q.block_size), out_dir),
        _external(init_name, "scales", q.scales, scale_type, (*q.lead, q.blocks), out_dir),
        k=q.k,
        block_size=q.block_size,
        global_scale=glob,
    )
