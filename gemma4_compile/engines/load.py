"""Reading an engine back: manifest check first, then the file's sha256, then (GPU only) deserialization."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable, BuildError
from ..export.manifest import DECODER, ExportManifest
from ..fsutil import sha256_file
from ..targets import resolve_target
from .manifest import EngineManifest, check_engine, check_graphs, read_manifest
from .seam import TrtFlavour


@dataclass(frozen=True)
class EngineFile:
    dir: Path
    manifest: EngineManifest
    path: Path


def engine_dir(export_dir: str | Path, target: str) -> Path:
    """OUT/engines/<sm> for a target given by SM or GPU name ('h200' -> OUT/engines/sm90)."""
    return Path(export_dir) / "engines" / resolve_target(target).name


def verify_files(directory: Path, manifest: EngineManifest) -> None:
    """Every file the manifest lists exists with its recorded size and sha256."""
    for name, meta in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise BuildError(f"{path} is missing (listed in {directory / 'manifest.json'})")
        if path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
            raise BuildError(f"{path} does not match its sha256 in the manifest; rebuild with --force")


def check_built_from(directory: Path, manifest: EngineManifest, export_sha256: str) -> None:
    """Refuse an engine built from another export (another export.json: other graphs, weights or dims)."""
    if manifest.export_sha256 and export_sha256 and manifest.export_sha256 != export_sha256:
        raise BuildError(
            f"engine {directory} was built from export {manifest.export_sha256[:12]}, this export is "
            f"{export_sha256[:12]}; rebuild with build --force"
        )


def open_engine(
    directory: str | Path,
    trt_flavour: TrtFlavour | None,
    device_sm: int | None,
    export_sha256: str = "",
    export: ExportManifest | None = None,
    role: str = DECODER,
) -> EngineFile:
    """Check manifest vs the export (every graph's ONNX sha256 when `export` is given, then its export.json
    sha256), the TensorRT and GPU at hand, then every file; -> the `role` graph's EngineFile (nothing
    deserialized)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if export is not None:
        check_graphs(manifest, export)  # names the graph whose ONNX changed
    check_built_from(directory, manifest, export_sha256 or (export.sha256 if export else ""))
    check_engine(manifest, trt_flavour, device_sm)
    verify_files(directory, manifest)
    engine = manifest.decoder if role == DECODER else manifest.graphs.get(role)
    if engine is None:
        raise BuildError(
            f"engine {manifest.target} has no {role} engine; build with --graphs including {role}"
        )
    return EngineFile(directory, manifest, directory / engine.engine_file)


def deserialize(engine: EngineFile, trt_flavour: TrtFlavour, device_sm: int | None, logger: Any) -> Any:
    """ICudaEngine from a checked EngineFile. Refuses without a GPU: a driverless TensorRT runtime can segfault."""
    if device_sm is None:
        raise BackendUnavailable(
            "trt: no CUDA GPU; refusing to create a TensorRT runtime (it can crash without one)"
        )
    check_engine(engine.manifest, trt_flavour, device_sm)
    runtime = trt_flavour.module.Runtime(logger)
    cuda_engine = runtime.deserialize_cuda_engine(engine.path.read_bytes())
    if cuda_engine is None:
        raise BackendUnavailable(f"trt: {trt_flavour.title} could not deserialize {engine.path}")
    return runtime, cuda_engine
