"""manifest.json per engine: what was built, from what, with what, and the check that refuses a mismatch.

An engine is tied to the TensorRT flavour and exact version that built it and to one GPU SM
(docs/tensorrt.md, engines are tied to a GPU and a version), so `check_engine` compares both before anything deserializes the plan.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable, BuildError
from ..fsutil import ENGINE_FORMAT, ENGINE_MANIFEST
from ..targets import TARGETS, GpuTarget
from .profiles import ShapeProfile
from .seam import TITLES, TrtFlavour

MANIFEST_FORMAT = ENGINE_FORMAT
MANIFEST_NAME, ENGINE_NAME, CAPABILITY_NAME, LOG_NAME = (
    ENGINE_MANIFEST,
    "decoder.engine",
    "capability.json",
    "build.log",
)


@dataclass(frozen=True)
class EngineManifest:
    target: str  # sm89
    sm: int  # 89
    flavour: str  # tensorrt | tensorrt_rtx
    trt_version: str
    precision: str  # the export dtype; the network is strongly typed
    export_sha256: str  # of export.json (which fingerprints every export file)
    decoder_sha256: str
    profiles: tuple[ShapeProfile, ...]
    opt_level: int
    hardware_compat: str
    plugins: dict[str, Any]
    capability: dict[str, int]  # path -> node count (plugin / inlined / ...)
    timing_cache: dict[str, Any]
    build_seconds: float
    phase_seconds: dict[str, float]  # parse (incl. config) and build
    memory: dict[str, int]  # MemoryUsage.to_dict()
    io: tuple[dict[str, Any], ...]  # engine inputs/outputs: name, mode, dtype
    files: dict[str, dict[str, Any]]  # file name -> {"sha256", "bytes"}
    engine_file: str = ENGINE_NAME
    tools: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    weight_format: str = ""  # the export's (dtypes.WEIGHT_FORMATS); "" in manifests written before it existed
    # {"activation_bytes": per execution context, "weights_bytes", "how"} (build.device_memory); {} if older
    device_memory: dict[str, Any] = field(default_factory=dict)

    @property
    def trt_title(self) -> str:
        return f"{TITLES.get(self.flavour, self.flavour)} {self.trt_version}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["profiles"] = [p.to_dict() for p in self.profiles]
        return {"format": MANIFEST_FORMAT, "version": 1, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineManifest:
        if d.get("format") != MANIFEST_FORMAT or d.get("version") != 1:
            raise BuildError(
                f"not an engine manifest: format {d.get('format')!r} version {d.get('version')!r}"
            )
        fields = {k: v for k, v in d.items() if k not in ("format", "version")}
        fields["profiles"] = tuple(ShapeProfile.from_dict(p) for p in d["profiles"])
        fields["io"] = tuple(d.get("io", ()))
        return cls(**fields)


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
