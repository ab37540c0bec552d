"""The embed graph's gathered tables, read from the export's data file by row instead of loaded whole.

E2B's PLE table is 4.4 GiB in int8 (8.8 GiB in fp32) and a call reads a few hundred of its 262,144 rows. onnxruntime
maps external initializers, but a page fault there brings in a whole read-ahead window or large folio (8 MiB on
the CI disk), so one 512-token prompt makes most of the table resident. Here the session gets a copy of
embed.onnx whose gathered tables are graph inputs instead of initializers, and each call feeds compact tables
holding only the rows it gathers, read with `pread` (page cache, not this process's memory), with `input_ids`
renumbered into them.

Renumbering keeps the graph's meaning: every table is gathered by the same indices (checked), the ids the
graph compares against (the multimodal placeholders, which it swaps for `pad` before gathering) keep their
values, and `pad` keeps slot `pad`. Other ids take the free slots 0, 1, ... in order.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..errors import RunnerError

MAX_PAD = 4096  # pad keeps its slot, so the compact tables have at least pad + 1 rows


@dataclass(frozen=True)
class RowTable:
    """One gathered initializer: rows [V, ...] of `dtype` at `offset` in `path`."""

    name: str
    path: Path
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @functools.cached_property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def read(self, fd: int, ids: list[int]) -> np.ndarray:
        """Rows `ids` as [len(ids), ...], one pread each (into a bytearray: no numpy call per row)."""
        size = self.row_bytes
        buf = bytearray(len(ids) * size)
        view = memoryview(buf)
        for i, row in enumerate(ids):
            if os.preadv(fd, [view[i * size : (i + 1) * size]], self.offset + row * size) != size:
                raise RunnerError(f"ort: {self.path.name} is shorter than table '{self.name}'")
        return np.frombuffer(buf, dtype=self.dtype).reshape(len(ids), *self.shape[1:])


class RowReader:
    """Feeds an embed graph whose tables `tables` became inputs: `feeds(input_ids)` -> renumbered ids + rows."""

    def __init__(self, tables: list[RowTable], placeholders: tuple[int, ...], pad: int):
        self.tables, self.placeholders, self.pad = tables, frozenset(placeholders), pad
        self.vocab = min(t.shape[0] for t in tables)
        self._fds = {p: os.open(p, os.O_RDONLY) for p in {t.path for t in tables}}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        self.close()

    def feeds(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The embed graph's `input_ids` (renumbered) and its tables (the rows they index)."""
        ids, source = self.renumber(input_ids)
        return {"input_ids": ids, **{t.name: t.read(self._fds[t.path], source) for t in self.tables}}

    def renumber(self, input_ids: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """-> (input_ids with every non-placeholder id replaced by its slot, the id whose row fills each slot).
        Plain Python and two numpy calls: a decode step renumbers one id per row, right after the decoder has
        evicted the caches, where each numpy call costs several microseconds (benchmarks/RESULTS.md)."""
        ids, placeholders, pad = input_ids.ravel().tolist(), self.placeholders, self.pad
        others = sorted({i for i in ids if i not in placeholders and i != pad})
        if others and (others[0] < 0 or others[-1] >= self.vocab):
            bad = others[0] if others[0] < 0 else others[-1]
            raise RunnerError(f"ort: token id {bad} is outside the vocabulary (0..{self.vocab - 1})")
        slot_of, slot = {pad: pad}, 0
        for i in others:  # the free slots 0, 1, ... in order; pad and the placeholders keep theirs
            while slot == pad or slot in placeholders:
                slot += 1
            slot_of[i], slot = slot, slot + 1
        source = [pad] * (max(slot_of.values()) + 1)
        for i, at in slot_of.items():
            source[at] = i
        renumbered = [i if i in placeholders else slot_of[i] for i in ids]
        return np.array(renumbered, dtype=input_ids.dtype).reshape(input_ids.shape), source


def row_tables(model: onnx.ModelProto, base_dir: Path) -> list[RowTable]:
    """The external initializers of `model` read only by `Gather(W, ids)` along axis 0, all by the same ids (an
    empty list when there are none or when they are gathered by different indices)."""
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, i))
    tables, indices = [], set()
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL or len(init.dims) < 2:
            continue
        readers = uses.get(init.name, [])
        if not readers or not all(_row_gather(node, i) for node, i in readers):
            continue
        indices.update(node.input[1] for node, _ in readers)
        info = {e.key: e.value for e in init.external_data}
        tables.append(
            RowTable(
                init.name,
                base_dir / info["location"],
                int(info.get("offset", 0)),
                tuple(init.dims),
                helper.tensor_dtype_to_np_dtype(init.data_type),
            )
        )
    return tables if len(indices) == 1 else []


def _row_gather(node: onnx.NodeProto, i: int) -> bool:
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    return node.op_type == "Gather" and node.domain in ("", "ai.onnx") and i == 0 and axis == 0


def as_inputs(model: onnx.ModelProto, tables: list[RowTable]) -> onnx.ModelProto:
    """A copy of `model` in which `tables` are graph inputs (first dimension free) instead of initializers."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = {t.name for t in tables}
    kept = [i for i in out.graph.initializer if i.name not in names]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    for t in tables:
        elem = helper.np_dtype_to_tensor_dtype(t.dtype)
        out.graph.input.append(helper.make_tensor_value_info(t.name, elem, [f"{t.name}_rows", *t.shape[1:]]))
    return out


def row_reader(path: Path, placeholders: tuple[int, ...], pad: int) -> tuple[RowReader, bytes] | None:
    """For embed graph `path`: the reader and the serialized graph it feeds, or None when nothing is gathered
    from the data file by row (or `pad` is too large to keep its slot)."""
    model = onnx.load(path, load_external_data=False)
    tables = row_tables(model, path.parent)
    names = {t.name for t in tables}
    external = [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    if (
        not tables or pad > MAX_PAD or any(i.name not in names for i in external)
    ):  # the copy is loaded from bytes
        return None
    return RowReader(tables, placeholders, pad), as_inputs(model, tables).SerializeToString()
