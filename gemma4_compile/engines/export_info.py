"""The part of export.json (docs/export-format.md) that engine builds and runners consume."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BuildError
from ..fsutil import sha256_file

EXPORT_FORMAT = "gemma4-compile/export"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # ints are fixed; strings name a dim of export.json "dims"


@dataclass(frozen=True)
class GraphInfo:
    file: Path
    sha256: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


@dataclass(frozen=True)
class CustomNode:
    name: str
    op_type: str
    layer: int | None
    kind: str | None
    attributes: dict[str, Any]


@dataclass(frozen=True)
class ExportInfo:
    dir: Path
    dtype: str  # fp32 | fp16 | bf16
    opset: int
    max_seq_len: int
    dims: dict[str, Any]
    embed: GraphInfo
    decoder: GraphInfo
    caches: tuple[dict[str, Any], ...]
    custom_nodes: tuple[CustomNode, ...]
    sha256: str  # of export.json itself, which holds every file's sha256: one fingerprint for the export
    raw: dict[str, Any]

    @property
    def sliding_window(self) -> int | None:
        w = self.dims.get("sliding_cache_len")
        return w if isinstance(w, int) else None


def _tensors(entries: list[dict], where: str) -> tuple[TensorInfo, ...]:
    try:
        return tuple(TensorInfo(e["name"], e["dtype"], tuple(e["shape"])) for e in entries)
    except (KeyError, TypeError) as e:
        raise BuildError(f"export.json {where}: each tensor needs name, dtype and shape ({e})") from None


def _graph(root: Path, graphs: dict, name: str) -> GraphInfo:
    if name not in graphs:
        raise BuildError(f"export.json has no graphs.{name}; re-run gemma4-compile export")
    g = graphs[name]
    path = root / g["file"]
    if not path.is_file():
        raise BuildError(f"{path} is missing (listed in export.json graphs.{name})")
    return GraphInfo(path, g.get("sha256", ""), _tensors(g.get("inputs", []), f"graphs.{name}.inputs"),
                     _tensors(g.get("outputs", []), f"graphs.{name}.outputs"))  # fmt: skip


def read_export(export_dir: str | Path) -> ExportInfo:
    """Parse and sanity-check OUT/export.json; a BuildError names the first problem."""
    root = Path(export_dir)
    path = root / "export.json"
    if not path.is_file():
        raise BuildError(f"no export.json in {root}; run 'gemma4-compile export' first")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BuildError(f"{path} is not valid JSON ({e})") from None
    if raw.get("format") != EXPORT_FORMAT or raw.get("version") != 1:
        found = f"{raw.get('format')!r} version {raw.get('version')!r}"
        raise BuildError(f"{path}: expected format {EXPORT_FORMAT!r} version 1, found {found}")
    graphs = raw.get("graphs", {})
    nodes = tuple(
        CustomNode(n["name"], n["op_type"], n.get("layer"), n.get("kind"), dict(n.get("attributes", {})))
        for n in raw.get("custom_nodes", [])
    )
    return ExportInfo(
        dir=root, dtype=raw.get("dtype", "fp32"), opset=int(raw.get("opset", 0)),
        max_seq_len=int(raw.get("max_seq_len", 0)), dims=dict(raw.get("dims", {})),
        embed=_graph(root, graphs, "embed"), decoder=_graph(root, graphs, "decoder"),
        caches=tuple(raw.get("caches", [])), custom_nodes=nodes, sha256=sha256_file(path), raw=raw,
    )  # fmt: skip


def check_decoder_file(export: ExportInfo) -> None:
    """The decoder graph file (weights live in external data) still matches export.json."""
    if export.decoder.sha256 and sha256_file(export.decoder.file) != export.decoder.sha256:
        raise BuildError(f"{export.decoder.file} does not match its sha256 in export.json; re-run the export")
