"""`export.json`: everything later stages need to know about an export (see docs/export-format.md)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ExportError
from ..model.config import Gemma4Spec

FORMAT, VERSION = "gemma4-compile/export", 1
MANIFEST = "export.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float32" | "float16" | "bfloat16" | "int64"
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass(frozen=True)
class GraphInfo:
    file: str
    sha256: str
    external_data: list[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)


@dataclass(frozen=True)
class CacheInfo:
    index: int
    layer: int
    kind: str  # "sliding" | "global"
    window: int
    slots: str  # symbolic dim of the ring size
    num_kv_heads: int
    head_dim: int
    consumers: list[int]
    past: list[str]
    present: list[str]


@dataclass(frozen=True)
class ExportManifest:
    """A finished export directory, as later stages see it."""

    path: Path
    dtype: str
    opset: int
    max_seq_len: int
    spec: Gemma4Spec
    graphs: dict[str, GraphInfo]
    caches: list[CacheInfo]
    custom_nodes: list[dict[str, Any]]
    files: dict[str, str]
    tools: dict[str, str]
    debug: bool = False
    weights: bool = True
    lowering: str | None = None  # "gqa": an onnxruntime-only variant (export/lowering.py)
    checkpoint: str | None = None  # absolute path of the source checkpoint (provenance; reference runners)
    dims: dict[str, Any] = field(default_factory=dict)

    def graph_path(self, name: str) -> Path:
        return self.path / self.graphs[name].file

    def to_json(self) -> dict[str, Any]:
        d = {"format": FORMAT, "version": VERSION}
        body = asdict(self)
        body.pop("path")
        body["spec"] = self.spec.to_dict()
        for g in body["graphs"].values():
            for key in ("inputs", "outputs"):
                g[key] = [{**t, "shape": list(t["shape"])} for t in g[key]]
        d.update(body)
        return d

    def save(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls, export_dir: str | Path) -> ExportManifest:
        path = Path(export_dir)
        file, d = read_manifest_json(path)
        try:
            graphs = {
                name: GraphInfo(g["file"], g["sha256"], g["external_data"],
                                tensor_specs(g["inputs"], f"graphs.{name}.inputs"),
                                tensor_specs(g["outputs"], f"graphs.{name}.outputs"))
                for name, g in d["graphs"].items()
            }  # fmt: skip
            return cls(
                path=path, dtype=d["dtype"], opset=d["opset"], max_seq_len=d["max_seq_len"],
                spec=Gemma4Spec.from_dict(d["spec"]), graphs=graphs,
                caches=[CacheInfo(**c) for c in d["caches"]], custom_nodes=d["custom_nodes"], files=d["files"],
                tools=d["tools"], debug=d.get("debug", False), weights=d.get("weights", True),
                checkpoint=d.get("checkpoint"), lowering=d.get("lowering"),
                dims=d.get("dims", {}),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(f"{file}: malformed manifest ({e})") from None


def read_manifest_json(export_dir: Path) -> tuple[Path, dict[str, Any]]:
    """(path, content) of OUT/export.json after the checks every reader needs: it exists, parses, and has this
    format and version. Later stages that need less than a full ExportManifest start here too."""
    file = export_dir / MANIFEST
    if not file.is_file():
        raise ExportError(f"{export_dir} is not an export directory (no {MANIFEST}); run 'gemma4-compile export' first")
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != VERSION:
        found = f"{d.get('format')!r} version {d.get('version')!r}" if isinstance(d, dict) else type(d).__name__
        raise ExportError(f"{file}: expected format {FORMAT!r} version {VERSION}, found {found}")
    return file, d


def tensor_specs(entries: list[dict[str, Any]], where: str) -> list[TensorSpec]:
    """A graph's `inputs` or `outputs` list -> TensorSpecs; `where` names the list in errors."""
    try:
        return [TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in entries]
    except (KeyError, TypeError) as e:
        raise ExportError(f"export.json {where}: each tensor needs name, dtype and shape ({e})") from None
