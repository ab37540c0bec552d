"""Stream checkpoint tensors into one external-data file shared by both graphs, one chunk at a time.

Peak memory is one chunk, not one model: tensors are read with plain reads (mapped pages would count against
RSS), converted to the export dtype chunk by chunk and appended. The tied embedding is written once and
referenced by the embed graph (gather) and the decoder (LM head).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from ..dtypes import DType
from ..errors import ExportError
from ..model.weights import TensorEntry

DATA_FILE = "weights.data"
ALIGN = 64
CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class Placed:
    offset: int
    length: int


def _write_converted(src: TensorEntry, dst, dtype: torch.dtype) -> int:
    """Append `src` converted to `dtype`; returns bytes written."""
    in_size = torch.empty((), dtype=src.dtype).element_size()
    step = max(in_size, CHUNK_BYTES // in_size * in_size)
    written = 0
    with open(src.file, "rb") as f:
        f.seek(src.offset)
        remaining = src.nbytes
        while remaining:
            raw = f.read(min(step, remaining))
            if not raw:
                raise ExportError(f"{src.file.name}: truncated while reading tensor '{src.key}'")
            remaining -= len(raw)
            if src.dtype == dtype:
                data = raw
            else:
                chunk = torch.frombuffer(bytearray(raw), dtype=src.dtype)
                data = chunk.to(dtype).view(torch.uint8).numpy().tobytes()
            dst.write(data)
            written += len(data)
    return written


def write_weight_file(
    out_dir: Path, entries: dict[str, TensorEntry], dtype: torch.dtype, write_data: bool = True
) -> dict[str, Placed]:
    """Lay out (and, with write_data, write) every tensor in name order; returns name -> placement."""
    placed: dict[str, Placed] = {}
    itemsize = torch.empty((), dtype=dtype).element_size()
    offset = 0
    try:
        with open(out_dir / DATA_FILE, "wb") if write_data else contextlib.nullcontext() as dst:
            for name in sorted(entries):
                entry = entries[name]
                pad = -offset % ALIGN
                if dst is not None and pad:
                    dst.write(b"\0" * pad)
                offset += pad
                length = int(np.prod(entry.shape, dtype=np.int64)) * itemsize
                if dst is not None and _write_converted(entry, dst, dtype) != length:
                    raise ExportError(f"tensor '{entry.key}' did not convert to {length} bytes")
                placed[name] = Placed(offset, length)
                offset += length
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
