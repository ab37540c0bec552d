"""TensorRT engines per GPU target, built from an export and fingerprinted (docs/export-format.md in, engines out).

    from gemma4_compile.engines import build_engines
    build_engines("OUT", ["sm89", "sm120"])   # -> OUT/engines/sm89/{decoder.engine, manifest.json, ...}

Importing this package imports no TensorRT; the flavour is loaded when a build or a check needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..targets import TARGETS, GpuTarget, local_device_sm, resolve_target
from .build import EngineArtifact, build_engine, build_engines_with, plan_builds
from .capability import CapabilityReport, NodePath
from .config import BuildOptions
from .export_info import ExportInfo, read_export
from .load import EngineFile, engine_dir, open_engine
from .manifest import EngineManifest, check_engine, read_manifest
from .profiles import ProfileLimits, ShapeProfile, derive_profiles
from .trt import TrtFlavour, installed_flavours, load_trt

__all__ = [
    "TARGETS", "BuildOptions", "CapabilityReport", "EngineArtifact", "EngineFile", "EngineManifest", "ExportInfo",
    "GpuTarget", "NodePath", "ProfileLimits", "ShapeProfile", "TargetStatus", "TrtFlavour", "build_engine",
    "build_engines", "check_engine", "derive_profiles", "engine_dir", "installed_flavours", "list_targets",
    "load_trt", "open_engine", "plan_builds", "read_export", "read_manifest", "resolve_target",
]  # fmt: skip


def build_engines(
    export_dir: str | Path,
    targets: list[str],
    *,
    plugins: bool = False,
    opt_level: int = 3,
    max_batch: int = 4,
    max_seq: int | None = None,
    force: bool = False,
    progress: bool = True,
    profiles: tuple[str, ...] = ("prefill", "decode"),
    flavour: str | None = None,
    hardware_compat: str = "auto",
    timing_cache_dir: str | Path | None = None,
) -> list[EngineArtifact]:
    """Build one engine per target from OUT/export.json into OUT/engines/<sm>/.

    Args:
        export_dir: the export directory (holds export.json).
        targets: SM names ('sm89'), GPU names ('l40s', 'h200') or 'native'. Every target is checked against the
            installed TensorRT before any build starts; an unbuildable one raises a one-line BuildError.
        plugins: register gemma4 plugins (gemma4_compile.plugins.registration) so custom nodes become plugins;
            otherwise (or if registration fails, which is recorded) their ONNX function bodies are inlined.
        opt_level: builder optimization level, 0..5.
        max_batch: largest batch of both profiles.
        max_seq: longest prefill and longest global cache; None = the export's max_seq_len.
        force: rebuild even when an up-to-date engine (same export, TensorRT, target and options) exists.
        progress: draw TensorRT's build phases on stderr.
        profiles: which optimization profiles to build ('prefill': sequence 1..max_seq, 'decode': sequence 1).
        flavour: 'tensorrt' or 'tensorrt_rtx' to force one; None picks per target (full TensorRT on its own GPU,
            else TensorRT-RTX ahead of time).
        hardware_compat: full TensorRT only: auto | none | same_cc | ampere_plus.
        timing_cache_dir: where per-target timing caches live; None = OUT/engines/timing-cache.
    """
    limits = ProfileLimits(max_batch=max_batch, max_seq=max_seq, profiles=tuple(profiles))
    options = BuildOptions(
        plugins=plugins, opt_level=opt_level, limits=limits, hardware_compat=hardware_compat,
        timing_cache_dir=Path(timing_cache_dir) if timing_cache_dir else None, progress=progress,
    )  # fmt: skip
    return build_engines_with(export_dir, targets, options, force=force, flavour=flavour)


@dataclass(frozen=True)
class TargetStatus:
    target: GpuTarget
    builder: str | None  # title of the TensorRT that would build it here, None if none can
    reason: str | None  # why not, when builder is None


def list_targets() -> list[TargetStatus]:
    """Every known target and whether (and with which TensorRT) this machine can build it."""
    from ..errors import BuildError
    from .trt import choose_flavour

    flavours, device_sm = installed_flavours(), local_device_sm()
    out = []
    for target in TARGETS.values():
        try:
            out.append(TargetStatus(target, choose_flavour(target, flavours, device_sm).title, None))
        except BuildError as e:
            out.append(TargetStatus(target, None, str(e)))
    return out
