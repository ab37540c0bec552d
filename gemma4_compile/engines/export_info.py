"""The part of export.json (docs/export-format.md) that engine builds and runners consume."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BuildError, ExportError
from ..export.manifest import TensorSpec, read_manifest_json, tensor_specs
from ..fsutil import sha256_file


@dataclass(frozen=True)
class GraphInfo:
    file: Path
    sha256: str
    inputs: tuple[TensorSpec, ...]  # shape: ints are fixed; strings name a dim of export.json "dims"
    outputs: tuple[TensorSpec, ...]


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


def _graph(root: Path, graphs: dict, name: str) -> GraphInfo:
    if name not in graphs:
        raise BuildError(f"export.json has no graphs.{name}; re-run gemma4-compile export")
    g = graphs[name]
    path = root / g["file"]
    if not path.is_file():
        raise BuildError(f"{path} is missing (listed in export.json graphs.{name})")
    return GraphInfo(path, g.get("sha256", ""), tuple(tensor_specs(g.get("inputs", []), f"graphs.{name}.inputs")),
                     tuple(tensor_specs(g.get("outputs", []), f"graphs.{name}.outputs")))  # fmt: skip


def read_export(export_dir: str | Path) -> ExportInfo:
    """Parse and sanity-check OUT/export.json; a BuildError names the first problem.

    Lenient where ExportManifest is strict (no full spec needed), so engine builds also take exports of graphs
    the exporter did not write; the file-level checks are the same (export.manifest.read_manifest_json).
    """
    root = Path(export_dir)
    try:
        path, raw = read_manifest_json(root)
        return _export_info(root, path, raw)
    except ExportError as e:
        raise BuildError(str(e)) from None


def _export_info(root: Path, path: Path, raw: dict[str, Any]) -> ExportInfo:
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
