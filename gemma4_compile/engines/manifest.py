"""manifest.json per target directory: what was built, from what, with what, and the checks that refuse a mismatch.

One directory per target holds one engine per graph of the export (decoder, embed, vision, audio); the manifest
has one `graphs` entry per engine (GraphEngine). An engine is tied to the TensorRT flavour and exact version
that built it and to one GPU SM (docs/tensorrt.md, engines are tied to a GPU and a version), so `check_engine`
compares both before anything deserializes a plan, and `check_graphs` that every engine was built from the
ONNX graph the export now holds.

Version 1 manifests (one decoder engine, before per-graph engines) are still read: they become a manifest with
one `decoder` graph.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable, BuildError
from ..export.manifest import DECODER, ExportManifest
from ..fsutil import ENGINE_FORMAT, ENGINE_MANIFEST
from ..targets import TARGETS, GpuTarget
from .profiles import ShapeProfile
from .seam import TITLES, TrtFlavour

MANIFEST_FORMAT, MANIFEST_VERSION = ENGINE_FORMAT, 2
MANIFEST_NAME, ENGINE_NAME, CAPABILITY_NAME, LOG_NAME = (
    ENGINE_MANIFEST,
    "decoder.engine",
    "capability.json",
    "build.log",
)


def graph_files(role: str) -> tuple[str, str, str]:
    """(engine, capability report, build log) file names of one graph; the decoder keeps the version-1 names."""
    if role == DECODER:
        return ENGINE_NAME, CAPABILITY_NAME, LOG_NAME
    return f"{role}.engine", f"{role}.{CAPABILITY_NAME}", f"{role}.{LOG_NAME}"


@dataclass(frozen=True)
class GraphEngine:
    """One graph's engine in a target directory."""

    role: str  # decoder | embed | vision | audio (export.json graphs)
    onnx_file: str  # the export's graph file it was built from
    onnx_sha256: str  # that file's sha256 as export.json recorded it
    engine_file: str
    profiles: tuple[ShapeProfile, ...]
    capability: dict[str, int]  # path -> custom node count (plugin / inlined / ...)
    io: tuple[dict[str, Any], ...]  # engine inputs/outputs: name, mode, dtype, shape
    build_seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)  # parse (incl. config) and build
    # {"activation_bytes": per execution context, "weights_bytes", "how"} (build.device_memory); {} if older
    device_memory: dict[str, Any] = field(default_factory=dict)
    # layers of the parsed network that compute in fp32 in a half-precision export (the ONNX's fp32 islands;
    # the network is strongly typed, so the engine keeps them); None in version-1 manifests
    fp32_layers: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["profiles"] = [p.to_dict() for p in self.profiles]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GraphEngine:
        fields = {**d, "profiles": tuple(ShapeProfile.from_dict(p) for p in d["profiles"])}
        return cls(**{**fields, "io": tuple(d.get("io", ()))})


@dataclass(frozen=True)
class EngineManifest:
    target: str  # sm89
    sm: int  # 89
    flavour: str  # tensorrt | tensorrt_rtx
    trt_version: str
    precision: str  # the export dtype; the network is strongly typed
    export_sha256: str  # of export.json (which fingerprints every export file)
    graphs: dict[str, GraphEngine]  # by role, in the export's pipeline order
    opt_level: int
    hardware_compat: str
    plugins: dict[str, Any]
    timing_cache: dict[str, Any]
    build_seconds: float  # every graph together
    memory: dict[str, int]  # MemoryUsage.to_dict()
    files: dict[str, dict[str, Any]]  # file name -> {"sha256", "bytes"}
    tools: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    weight_format: str = ""  # the export's (dtypes.WEIGHT_FORMATS); "" in manifests written before it existed

    @property
    def trt_title(self) -> str:
        return f"{TITLES.get(self.flavour, self.flavour)} {self.trt_version}"

    @property
    def decoder(self) -> GraphEngine:
        """The decoder's engine (what the TensorRT runner runs); BuildError when this build left it out."""
        if DECODER not in self.graphs:
            raise BuildError(
                f"engine {self.target} has no decoder engine (built: {', '.join(self.graphs)}); "
                "build with --graphs including decoder"
            )
        return self.graphs[DECODER]

    # the decoder's, as version-1 manifests had them at the top level
    @property
    def engine_file(self) -> str:
        return self.decoder.engine_file

    @property
    def profiles(self) -> tuple[ShapeProfile, ...]:
        return self.decoder.profiles

    @property
    def io(self) -> tuple[dict[str, Any], ...]:
        return self.decoder.io

    @property
    def capability(self) -> dict[str, int]:
        return self.decoder.capability

    @property
    def decoder_sha256(self) -> str:
        return self.decoder.onnx_sha256

    @property
    def device_memory(self) -> dict[str, Any]:
        return self.decoder.device_memory

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["graphs"] = {role: g.to_dict() for role, g in self.graphs.items()}
        if DECODER in self.graphs:  # the decoder's, for readers of version-1 manifests (validate's report)
            d.update(engine_file=self.engine_file, device_memory=self.device_memory)
        return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineManifest:
        version = d.get("version")
        if d.get("format") != MANIFEST_FORMAT or version not in (1, MANIFEST_VERSION):
            raise BuildError(f"not an engine manifest: format {d.get('format')!r} version {version!r}")
        if version == 1:
            d = _from_version_1(d)
        fields = {k: v for k, v in d.items() if k not in ("format", "version", *_V1_GRAPH_FIELDS)}
        fields["graphs"] = {role: GraphEngine.from_dict(g) for role, g in d["graphs"].items()}
        return cls(**fields)


_V1_GRAPH_FIELDS = ("profiles", "capability", "io", "phase_seconds", "device_memory", "engine_file")


def _from_version_1(d: dict[str, Any]) -> dict[str, Any]:
    """A version-1 manifest (one decoder engine, its fields at the top level) in the version-2 layout."""
    graph = {k: d[k] for k in _V1_GRAPH_FIELDS if k in d}
    graph.update(role=DECODER, onnx_file="decoder.onnx", onnx_sha256=d["decoder_sha256"])
    graph.update(build_seconds=d["build_seconds"])
    rest = {k: v for k, v in d.items() if k not in (*_V1_GRAPH_FIELDS, "decoder_sha256")}
    return {**rest, "graphs": {DECODER: graph}}


def write_manifest(manifest: EngineManifest, path: Path) -> None:
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")


def read_manifest(engine_dir: str | Path) -> EngineManifest:
    path = Path(engine_dir) / MANIFEST_NAME
    if not path.is_file():
        raise BuildError(f"no {MANIFEST_NAME} in {engine_dir}; build the engine with 'gemma4-compile build'")
    try:
        return EngineManifest.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise BuildError(f"{path} is not a valid engine manifest ({type(e).__name__}: {e})") from None


def check_graphs(manifest: EngineManifest, export: ExportManifest) -> None:
    """Refuse, in one line naming the graph, an engine built from another ONNX graph than the export now holds
    (or from a graph the export no longer has)."""
    for role, g in manifest.graphs.items():
        spec = export.graphs.get(role)
        if spec is None:
            raise BuildError(
                f"engine {manifest.target}: {g.engine_file} was built from {g.onnx_file}, which the export "
                "no longer has; rebuild with build --force"
            )
        if g.onnx_sha256 and spec.sha256 and g.onnx_sha256 != spec.sha256:
            raise BuildError(
                f"engine {manifest.target}: {g.engine_file} was built from {g.onnx_file} "
                f"{g.onnx_sha256[:12]}, the export's {spec.file} is {spec.sha256[:12]}; rebuild with build --force"
            )


def _sm_of(device: int | str | GpuTarget | None) -> int | None:
    if device is None or isinstance(device, int):
        return device
    if isinstance(device, GpuTarget):
        return device.sm
    key = device.lower().replace("sm_", "sm")
    return TARGETS[key].sm if key in TARGETS else int(key.removeprefix("sm"))


def check_engine(
    manifest: EngineManifest, trt_flavour: TrtFlavour | None, device_sm: int | str | GpuTarget | None
) -> None:
    """Refuse an engine built for another TensorRT or GPU: BackendUnavailable "expected X, found Y"."""
    expected = f"{manifest.trt_title} on sm{manifest.sm}"
    found_trt = trt_flavour.title if trt_flavour is not None else "no TensorRT"
    sm = _sm_of(device_sm)
    found_gpu = f"sm{sm}" if sm is not None else "no CUDA GPU"
    same_trt = trt_flavour is not None and (trt_flavour.name, trt_flavour.version) == (
        manifest.flavour,
        manifest.trt_version,
    )
    if not same_trt or sm != manifest.sm:
        raise BackendUnavailable(
            f"engine {manifest.target}: expected {expected}, found {found_trt} on {found_gpu}"
        )
