"""TensorRT engines per GPU target, built from an export and fingerprinted (docs/export-format.md in, engines out).

    from gemma4_compile.engines import BuildOptions, build_engines
    build_engines("OUT", ["sm89", "sm120"], BuildOptions(max_batch=4))
    # -> OUT/engines/sm89/{decoder.engine, embed.engine, vision.engine, audio.engine, manifest.json, ...}

Modules: seam (the TensorRT / TensorRT-RTX import seam, logger, plugin registry), prepare (graph passes, parse,
capability.json), profiles, build, manifest, load (what runners read back), progress. Importing this package
imports no TensorRT; the flavour is loaded when a build or a check needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..targets import TARGETS, GpuTarget, local_device_sm, resolve_target
from .build import (
    BuildOptions,
    BuildRecord,
    EngineArtifact,
    build_engine,
    build_engines,
    plan_builds,
    read_export,
)
from .load import EngineFile, engine_dir, open_engine
from .manifest import EngineManifest, GraphEngine, check_engine, check_graphs, read_manifest
from .prepare import CapabilityReport, NodePath
from .profiles import DEFAULT_MAX_BATCH, ProfileLimits, ShapeProfile, derive_profiles, engine_roles
from .seam import TrtFlavour, installed_flavours, load_trt

__all__ = [
    "DEFAULT_MAX_BATCH",
    "TARGETS",
    "BuildOptions",
    "BuildRecord",
    "CapabilityReport",
    "EngineArtifact",
    "EngineFile",
    "EngineManifest",
    "GpuTarget",
    "GraphEngine",
    "NodePath",
    "ProfileLimits",
    "ShapeProfile",
    "TargetStatus",
    "TrtFlavour",
    "build_engine",
    "build_engines",
    "check_engine",
    "check_graphs",
    "derive_profiles",
    "engine_dir",
    "engine_roles",
    "installed_flavours",
    "list_targets",
    "load_trt",
    "open_engine",
    "plan_builds",
    "read_export",
    "read_manifest",
    "resolve_target",
]


@dataclass(frozen=True)
class TargetStatus:
    target: GpuTarget
    builder: str | None  # title of the TensorRT that would build it here, None if none can
    reason: str | None  # why not, when builder is None


def list_targets() -> list[TargetStatus]:
    """Every known target and whether (and with which TensorRT) this machine can build it."""
    from ..errors import BuildError
    from .seam import choose_flavour

    flavours, device_sm = installed_flavours(), local_device_sm()
    out = []
    for target in TARGETS.values():
        try:
            out.append(TargetStatus(target, choose_flavour(target, flavours, device_sm).title, None))
        except BuildError as e:
            out.append(TargetStatus(target, None, str(e)))
    return out
