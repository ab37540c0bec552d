"""Checkpoint tensors: the names a spec expects, and a lazy reader for (sharded) safetensors.

Never pickle, never remote code: the reader parses safetensors headers itself, checks that every file holds
the bytes its header promises, and loads one tensor at a time.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..quant.formats import LINEAR_ROLES, role_of
from ..quant.imported import REFUSED_SUFFIXES, ImportedQuant, dequantize_imported, parse_import, unpack_int4
from .config import Gemma4Spec
from .vision_config import read_config_json

TEXT_PREFIXES = ("model.language_model.", "model.")
# Towers of the multimodal checkpoints: not part of the text decoder, ignored.
OTHER_TOWERS = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")

ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def expected_shapes(spec: Gemma4Spec) -> dict[str, tuple[int, ...]]:
    """Our tensor names (no prefix) -> shape, read off the model built on the meta device."""
    from .model import Gemma4TextModel

    with torch.device("meta"):
        model = Gemma4TextModel(spec)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def leftover_shapes(spec: Gemma4Spec) -> dict[str, tuple[int, ...]]:
    """Unused K/V tensors that released checkpoints still carry for KV-shared consumer layers."""
    out: dict[str, tuple[int, ...]] = {}
    H = spec.hidden_size
    for p in spec.layers:
        if p.owns_cache:
            continue
        base = f"layers.{p.index}.self_attn."
        out[base + "k_proj.weight"] = (p.num_kv_heads * p.head_dim, H)
        if p.has_v_proj:
            out[base + "v_proj.weight"] = (p.num_kv_heads * p.head_dim, H)
        out[base + "k_norm.weight"] = (p.head_dim,)
    return out


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live: file, absolute byte offset, length, dtype and shape."""

    key: str  # name as stored in the checkpoint
    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class PackedEntry(TensorEntry):
    """A pre-quantized Linear weight (quant/imported.py): `key` is its float name (`<module>.weight`), `shape` the
    float shape (N, K), `dtype` the scales' float dtype; the bytes are `packed`'s int32 codes and `scale`'s."""

    packed: TensorEntry
    scale: TensorEntry
    group_size: int
    source: str


# dtypes the model computes in; anything else (int8, bool, ...) is not a weight it can use
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors file, after checking the header: JSON object, known dtypes, shapes and byte
    ranges that agree, inside the file and not overlapping. A CheckpointError names the file and tensor."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path.name}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"{path.name}: truncated or corrupt safetensors header")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path.name}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not a JSON object)")
    entries = {
        key: _entry(path, key, info, 8 + n, size) for key, info in header.items() if key != "__metadata__"
    }
    _check_no_overlap(path, entries)
    return entries


def _entry(path: Path, key: str, info: Any, base: int, size: int) -> TensorEntry:
    """One header entry -> TensorEntry; its dtype is known, its shape and byte range agree and fit the file."""
    where = f"{path.name}: tensor '{key}'"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    dtype = ST_DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise CheckpointError(f"{where} has unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not _ints(shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not _ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise CheckpointError(
            f"{where}: data_offsets must be [begin, end] with begin <= end, got {offsets!r}"
        )
    a, b = offsets
    if base + b > size:
        raise CheckpointError(
            f"{path.name}: truncated: tensor '{key}' ends at byte {base + b} but the file has {size}"
        )
    expected = math.prod(shape) * dtype.itemsize
    if b - a != expected:
        raise CheckpointError(
            f"{where}: {b - a} bytes for shape {shape} of {info['dtype']} ({expected} expected)"
        )
    return TensorEntry(key, path, base + a, b - a, dtype, tuple(shape))


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def _check_no_overlap(path: Path, entries: dict[str, TensorEntry]) -> None:
    """Two tensors sharing bytes would alias each other: a corrupt or hand-made file."""
    spans = sorted((e.offset, e.offset + e.nbytes, e.key) for e in entries.values() if e.nbytes)
    end, last = 0, ""
    for begin, stop, key in spans:  # sorted by start: an overlap starts before the furthest end so far
        if begin < end:
            raise CheckpointError(f"{path.name}: tensors '{last}' and '{key}' overlap (byte {begin} of both)")
        end, last = stop, key


def check_finite(entry: TensorEntry, values: torch.Tensor) -> None:
    """Refuse a weight (or a chunk of one, while streaming) holding NaN or Inf."""
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        raise CheckpointError(f"tensor '{entry.key}' in {entry.file.name} holds NaN or Inf values")


class CheckpointReader:
    """Index of every tensor in a checkpoint directory (single file or sharded with an index)."""

    def __init__(self, checkpoint_dir: str | Path):
        self.dir = Path(checkpoint_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"checkpoint directory {self.dir} does not exist")
        self.entries: dict[str, TensorEntry] = {}
        for shard in self._shards():
            self.entries.update(read_safetensors_header(shard))

    def _shards(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index.name}: not a valid safetensors index") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (self.dir / s).is_file()]
            if missing:
                raise CheckpointError(f"shard file {missing[0]} listed in {index.name} is missing")
            return [self.dir / s for s in shards]
        single = self.dir / "model.safetensors"
        if single.is_file():
            return [single]
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {self.dir}")

    def load(self, entry: TensorEntry) -> torch.Tensor:
        """Read one tensor with plain reads (no mmap: mapped pages would count against RSS); a packed weight
        comes back dequantized (codes x scales, float32), the checkpoint's own weight."""
        if isinstance(entry, PackedEntry):
            codes, scales = self.load_codes(entry)
            return torch.from_numpy(dequantize_imported(codes, scales, entry.group_size))
        with open(entry.file, "rb") as f:
            f.seek(entry.offset)
            data = bytearray(f.read(entry.nbytes))
        if len(data) != entry.nbytes:
            raise CheckpointError(f"{entry.file.name}: truncated while reading tensor '{entry.key}'")
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        tensor = torch.frombuffer(data, dtype=entry.dtype).reshape(entry.shape)
        check_finite(entry, tensor)
        return tensor

    def load_codes(self, entry: PackedEntry) -> tuple[np.ndarray, np.ndarray]:
        """A packed weight's signed int4 codes int8 [N, K] and scales float32 [N, blocks], as stored."""
        packed = self.load(entry.packed).numpy()
        scales = self.load(entry.scale).to(torch.float32).numpy()
        return unpack_int4(packed, entry.shape[1]), scales


def checkpoint_quant(checkpoint_dir: str | Path) -> ImportedQuant | None:
    """The pre-quantized format of a checkpoint's config.json (None: float); CheckpointError if unreadable."""
    return parse_import(read_config_json(checkpoint_dir))


def _packed_entries(reader: CheckpointReader, imported: ImportedQuant) -> dict[str, TensorEntry]:
    """The reader's entries with each packed Linear's three tensors replaced by one PackedEntry under its float
    name, after checking them against each other (shapes, dtypes, group size)."""
    entries = dict(reader.entries)
    for key in [k for k in entries if k.endswith(tuple(REFUSED_SUFFIXES))]:
        what = REFUSED_SUFFIXES[key.rpartition(".")[2]]
        raise CheckpointError(f"{imported.source}: tensor '{key}' holds {what}, which is not supported")
    for key in [k for k in entries if k.endswith(".weight_packed")]:
        base = key.removesuffix("_packed")
        parts = [entries.pop(base + s, None) for s in ("_packed", "_scale", "_shape")]
        if None in parts:
            raise CheckpointError(f"{imported.source}: '{key}' has no {base}_scale or {base}_shape tensor")
        entries[base] = _packed_entry(reader, base, *parts, imported)
    return entries


def _packed_entry(
    reader: CheckpointReader,
    base: str,
    packed: TensorEntry,
    scale: TensorEntry,
    shape: TensorEntry,
    imported: ImportedQuant,
) -> PackedEntry:
    where = f"{imported.source}: '{base}' in {packed.file.name}"
    if shape.dtype not in (torch.int32, torch.int64) or shape.shape != (2,):
        raise CheckpointError(f"{where}: weight_shape must be 2 integers, got {list(shape.shape)}")
    n, k = (int(v) for v in reader.load(shape))
    group = imported.group_size
    blocks = -(-k // group)
    want = {
        "weight_packed": (packed, torch.int32, (n, -(-k // 8))),
        "weight_scale": (scale, scale.dtype, (n, blocks)),
    }
    for name, (entry, dtype, expect) in want.items():
        if entry.dtype != dtype or entry.shape != expect or scale.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(
                f"{where}: {name} is {ST_NAMES[entry.dtype]} {list(entry.shape)}, weight_shape [{n}, {k}] and "
                f"group size {group} need {ST_NAMES[dtype]} {list(expect)} (scales F32, F16 or BF16)"
            )
    return PackedEntry(
        base,
        packed.file,
        packed.offset,
        packed.nbytes,
        scale.dtype,
        (n, k),
        packed,
        scale,
        group,
        imported.source,
    )


def resolve_text_weights(
    reader: CheckpointReader, spec: Gemma4Spec, imported: ImportedQuant | None = None
) -> dict[str, TensorEntry]:
    """Map our names to checkpoint entries; error on missing, unexpected or mis-shaped tensors. With `imported`
    (a pre-quantized checkpoint), each packed Linear is one PackedEntry under its float name."""
    expected = expected_shapes(spec)
    leftovers = leftover_shapes(spec)
    found: dict[str, TensorEntry] = {}
    entries = _packed_entries(reader, imported) if imported is not None else reader.entries
    for key, entry in entries.items():
        if key.startswith(OTHER_TOWERS):
            continue
        prefix = next((p for p in TEXT_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise CheckpointError(
                f"unexpected tensor '{key}' in {entry.file.name} (not a Gemma 4 text weight)"
            )
        name = key[len(prefix) :]
        if name in leftovers and name not in expected:
            continue  # released checkpoints keep K/V weights of KV-shared layers; they are never used
        if name not in expected:
            raise CheckpointError(
                f"unexpected tensor '{key}' in {entry.file.name}: the config has no such weight"
            )
        check_entry(entry, expected[name], "config")
        if isinstance(entry, PackedEntry) and role_of(name) not in LINEAR_ROLES:
            raise CheckpointError(
                f"{entry.source}: '{key}' is packed, but only attention q/k/v/o and MLP gate/up/down weights can "
                "be imported in this version"
            )
        if name in found:
            raise CheckpointError(f"tensor '{name}' appears twice ('{found[name].key}' and '{key}')")
        found[name] = entry
    check_complete(expected, found, TEXT_PREFIXES[0], reader)
    return found


def check_entry(entry: TensorEntry, shape: tuple[int, ...], source: str) -> None:
    """A checkpoint tensor the model will use: a float dtype, and the shape `source` (a config) expects."""
    where = f"tensor '{entry.key}' in {entry.file.name}"
    if entry.dtype not in WEIGHT_DTYPES:
        raise CheckpointError(
            f"{where} has dtype {ST_NAMES[entry.dtype]}; the model needs F32, F16 or BF16 weights"
        )
    if entry.shape != shape:
        raise CheckpointError(f"{where} has shape {list(entry.shape)}, {source} expects {list(shape)}")


def check_complete(expected: dict, found: dict, prefix: str, reader: CheckpointReader) -> None:
    """Every expected tensor was found; the error names the first missing one."""
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor '{prefix}{missing[0]}'{more} in {reader.dir}")


def iter_text_weights(
    checkpoint_dir: str | Path, spec: Gemma4Spec, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our name, tensor) one at a time, converted to `dtype` if given (packed weights dequantized)."""
    reader = CheckpointReader(checkpoint_dir)
    for name, entry in resolve_text_weights(reader, spec, checkpoint_quant(checkpoint_dir)).items():
        t = reader.load(entry)
        yield name, t if dtype is None else t.to(dtype)


def imported_codes(checkpoint_dir: str | Path, spec: Gemma4Spec) -> dict[str, Callable[[], tuple]]:
    """Our name -> a reader of (codes, scales) for each packed weight of a pre-quantized checkpoint (empty for a
    float one): the fake-quant reference rebuilds what the export computes from them (quant/reference.py)."""
    imported = checkpoint_quant(checkpoint_dir)
    if imported is None:
        return {}
    reader = CheckpointReader(checkpoint_dir)
    entries = resolve_text_weights(reader, spec, imported)
    return {n: partial(reader.load_codes, e) for n, e in entries.items() if isinstance(e, PackedEntry)}


def load_model(
    checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32, spec: Gemma4Spec | None = None
):
    """Build `Gemma4TextModel` on the meta device and fill it tensor by tensor. A pre-quantized checkpoint's
    packed weights are dequantized; `model.imported_codes` reads their codes (imported_codes)."""
    from .model import Gemma4TextModel

    spec = spec or Gemma4Spec.from_pretrained(checkpoint_dir)
    with torch.device("meta"):
        model = Gemma4TextModel(spec)
    for name, tensor in iter_text_weights(checkpoint_dir, spec, dtype):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in module._buffers:
            module._buffers[attr] = tensor
        else:
            module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    model.reset_rope_buffers()  # meta -> real fp32 values; they are not in the checkpoint
    model.imported_codes = imported_codes(checkpoint_dir, spec)
    return model.eval()
