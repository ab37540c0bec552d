"""The build pipeline for one target, and `build_engines` over several.

    export.json -> NetworkFromOnnx -> capability.json -> ConfigFromNetwork -> EngineFromNetwork -> manifest.json
Output: OUT/engines/<sm>/{decoder.engine, capability.json, build.log, manifest.json}. A failed build leaves its
report in OUT/engines/<sm>.failed/ and never touches an existing good build.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from .. import __version__
from ..errors import BuildError
from ..targets import GpuTarget, local_device_sm, resolve_target
from .artifacts import file_entry, publish, staging_dir
from .capability import PLUGIN, CapabilityReport, capability_report
from .config import BuildConfig, BuildOptions, config_from_network
from .engine import PlanFile, engine_from_network
from .export_info import ExportInfo, check_decoder_file, read_export
from .load import verify_files
from .manifest import (
    CAPABILITY_NAME,
    ENGINE_NAME,
    LOG_NAME,
    MANIFEST_NAME,
    EngineManifest,
    read_manifest,
    write_manifest,
)  # fmt: skip
from .memory import MemoryUsage, PeakRss
from .network import ParsedNetwork, network_from_onnx
from .plugin_status import PluginStatus, find_kernels_json, register
from .profiles import ShapeProfile, derive_profiles, tokens_per_step
from .progress import build_progress, spinner
from .trt import TrtFlavour, choose_flavour, installed_flavours, load_trt

log = logging.getLogger("gemma4_compile.engines")


@dataclass(frozen=True)
class EngineArtifact:
    target: str
    dir: Path
    engine_path: Path
    manifest_path: Path
    capability_path: Path
    manifest: EngineManifest
    reused: bool  # True: an up-to-date build was found and nothing was rebuilt


def _json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def build_key(export: ExportInfo, target: GpuTarget, flavour: TrtFlavour, options: BuildOptions,
              profiles: tuple[ShapeProfile, ...]) -> str:  # fmt: skip
    """Fingerprint of everything that determines the engine; equal keys mean a rebuild would be redundant."""
    kernels = find_kernels_json(export.dir)
    request = {
        "export": export.sha256, "target": target.name, "flavour": flavour.name, "trt": flavour.version,
        "profiles": [p.to_dict() for p in profiles], "opt_level": options.opt_level, "plugins": options.plugins,
        "hardware_compat": options.hardware_compat,
        "kernels": hashlib.sha256(kernels.read_bytes()).hexdigest() if options.plugins and kernels else None,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def _up_to_date(final: Path, key: str) -> EngineManifest | None:
    if not (final / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(final)
        if manifest.tools.get("build_key") != key:
            return None
        if manifest.plugins.get("requested") and manifest.plugins.get("error"):
            return None  # plugins were asked for but failed last time: try again
        verify_files(final, manifest)
    except BuildError:
        return None
    return manifest


def _fail(
    staging: Path, final: Path, report: CapabilityReport, parsed: ParsedNetwork, message: str
) -> BuildError:
    """Publish the failure report to <sm>.failed/ and return the one-line error that points at it."""
    _json(staging / CAPABILITY_NAME, report.to_dict())
    (staging / LOG_NAME).write_text(parsed.logger.text())
    failed = final.with_name(f"{final.name}.failed")
    publish(staging, failed)
    return BuildError(f"{message} (report: {failed / CAPABILITY_NAME})")


def _io(parsed: ParsedNetwork) -> tuple[dict, ...]:
    net = parsed.network
    tensors = [("input", net.get_input(i)) for i in range(net.num_inputs)]
    tensors += [("output", net.get_output(i)) for i in range(net.num_outputs)]
    return tuple(
        {"name": t.name, "mode": mode, "dtype": t.dtype.name, "shape": list(t.shape)} for mode, t in tensors
    )


def _parse(export: ExportInfo, target: GpuTarget, flavour: TrtFlavour, options: BuildOptions,
           plugins: PluginStatus, profiles: tuple[ShapeProfile, ...], staging: Path,
           final: Path) -> tuple[ParsedNetwork, CapabilityReport]:  # fmt: skip
    with spinner(f"{target.name}: parsing {export.decoder.file.name} with {flavour.title}", options.progress):
        parsed = network_from_onnx(export, flavour, tokens_per_step(profiles))
    report = capability_report(target.name, export, parsed, plugins)
    if not parsed.ok:
        first = report.rejected[0].one_line()
        more = f" and {len(report.rejected) - 1} more" if len(report.rejected) > 1 else ""
        raise _fail(staging, final, report, parsed, f"{target.name}: {flavour.title} rejected {first}{more}")
    return parsed, report


def _compile(parsed: ParsedNetwork, build: BuildConfig, target: GpuTarget, options: BuildOptions,
             staging: Path) -> PlanFile:  # fmt: skip
    label = f"{target.name}:"
    with build_progress(parsed.flavour, label, options.progress) as monitor:
        return engine_from_network(parsed, build, staging / ENGINE_NAME, target.name, monitor)


def build_engine(export: ExportInfo, target: GpuTarget, flavour: TrtFlavour, options: BuildOptions,
                 *, force: bool = False) -> EngineArtifact:  # fmt: skip
    """Build (or reuse, unless `force`) the engine of one target; BuildError says what went wrong."""
    final = export.dir / "engines" / target.name
    profiles = derive_profiles(export, options.limits)
    key = build_key(export, target, flavour, options, profiles)
    existing = None if force else _up_to_date(final, key)
    if existing is not None:
        log.info("%s: up to date (%s)", target.name, final)
        return _artifact(final, existing, reused=True)
    check_decoder_file(export)
    plugins = register(flavour, options.plugins, export.dir)
    if plugins.error:
        log.warning("%s: plugins requested but not registered (%s); custom ops will be inlined",
                    target.name, plugins.error)  # fmt: skip
    cache_dir = options.timing_cache_dir or export.dir / "engines" / "timing-cache"
    with staging_dir(final) as staging:
        with PeakRss() as memory:
            t0 = time.perf_counter()
            parsed, report = _parse(export, target, flavour, options, plugins, profiles, staging, final)
            plugins_used = report.counts().get(PLUGIN, 0) > 0
            build = config_from_network(parsed, target, options, profiles, plugins_used=plugins_used,
                                        timing_cache=_cache_path(cache_dir, flavour, target))  # fmt: skip
            t1 = time.perf_counter()
            try:
                plan = _compile(parsed, build, target, options, staging)
            except BuildError as e:
                raise _fail(staging, final, report, parsed, str(e)) from None
            t2 = time.perf_counter()
            seconds = {"total": t2 - t0, "parse": t1 - t0, "build": t2 - t1}
        _json(staging / CAPABILITY_NAME, report.to_dict())
        (staging / LOG_NAME).write_text(parsed.logger.text())
        manifest = _manifest(export, target, parsed, options, profiles, plugins, report, build, plan, seconds,
                             memory.usage, staging, key)  # fmt: skip
        write_manifest(manifest, staging / MANIFEST_NAME)  # last: a directory with a manifest is complete
        publish(staging, final)
    _remove_stale_failure(final)
    return _artifact(final, manifest, reused=False)


def _remove_stale_failure(final: Path) -> None:
    failed = final.with_name(f"{final.name}.failed")
    if failed.is_dir():
        shutil.rmtree(failed, ignore_errors=True)


def _cache_path(cache_dir: Path, flavour: TrtFlavour, target: GpuTarget) -> Path | None:
    if not flavour.has_timing_cache:
        return None
    return cache_dir / f"{flavour.name}-{flavour.version}-{target.name}.cache"


def _manifest(export: ExportInfo, target: GpuTarget, parsed: ParsedNetwork, options: BuildOptions,
              profiles: tuple[ShapeProfile, ...], plugins: PluginStatus, report: CapabilityReport,
              build: BuildConfig, plan: PlanFile, seconds: dict[str, float], memory: MemoryUsage | None, staging: Path,
              key: str) -> EngineManifest:  # fmt: skip
    files = {ENGINE_NAME: {"sha256": plan.sha256, "bytes": plan.bytes}}
    for name in (CAPABILITY_NAME, LOG_NAME):
        files[name] = file_entry(staging / name)
    return EngineManifest(
        target=target.name, sm=target.sm, flavour=parsed.flavour.name, trt_version=parsed.flavour.version,
        precision=export.dtype, export_sha256=export.sha256, decoder_sha256=export.decoder.sha256,
        profiles=profiles, opt_level=options.opt_level, hardware_compat=build.hardware_compat,
        plugins=plugins.to_dict(), capability=report.counts(), timing_cache=build.timing_cache.to_dict(),
        build_seconds=round(seconds["total"], 3), phase_seconds={k: round(v, 3) for k, v in seconds.items()},
        memory=memory.to_dict() if memory else {}, io=_io(parsed), files=files,
        tools={"gemma4_compile": __version__, "onnx": onnx.__version__, "python": platform.python_version(),
               "host": platform.node(), "build_key": key},
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )  # fmt: skip


def _artifact(final: Path, manifest: EngineManifest, reused: bool) -> EngineArtifact:
    return EngineArtifact(manifest.target, final, final / manifest.engine_file, final / MANIFEST_NAME,
                          final / CAPABILITY_NAME, manifest, reused)  # fmt: skip


def resolve_targets(targets: list[str]) -> tuple[GpuTarget, ...]:
    """Names ('sm89', 'l40s', 'native') -> unique targets in the given order; [] is an error."""
    if not targets:
        raise BuildError("no target given; name at least one, e.g. --target sm89 (see the target list)")
    out: list[GpuTarget] = []
    for name in targets:
        target = resolve_target(name)
        if target not in out:
            out.append(target)
    return tuple(out)


def plan_builds(targets: list[str], flavour: str | None = None,
                device_sm: int | None = None) -> tuple[tuple[GpuTarget, TrtFlavour], ...]:  # fmt: skip
    """Pick the TensorRT for every target before building anything, so an unbuildable target fails fast."""
    resolved = resolve_targets(targets)
    flavours = (load_trt(flavour),) if flavour else installed_flavours()
    if not flavours:
        load_trt()  # raises the "no TensorRT is installed" error
    return tuple((t, choose_flavour(t, flavours, device_sm)) for t in resolved)


def build_engines_with(export_dir: str | Path, targets: list[str], options: BuildOptions, *, force: bool = False,
                       flavour: str | None = None) -> list[EngineArtifact]:  # fmt: skip
    """`build_engines` with a ready BuildOptions (the CLI's dataclass path)."""
    export = read_export(export_dir)
    plan = plan_builds(targets, flavour, local_device_sm())
    return [build_engine(export, target, fl, options, force=force) for target, fl in plan]
