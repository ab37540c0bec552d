"""Build one engine per target: export.json -> parsed network -> builder config -> serialized plan -> manifest.

Output: OUT/engines/<sm>/{decoder.engine, capability.json, build.log, manifest.json}, written into a temporary
directory that replaces the final one only when complete (fsutil.atomic_directory), manifest last. A failed
build leaves its report in OUT/engines/<sm>.failed/ and never touches an existing good build. Precision is never
set here: networks are strongly typed, so the ONNX dtypes are the engine's dtypes.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import platform
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import onnx

from .. import __version__
from ..errors import BuildError, ExportError
from ..export.manifest import DECODER, ExportManifest
from ..fsutil import atomic_directory, write_atomic
from ..quant.formats import GRAPH_NBITS, MIN_SM
from ..targets import GpuTarget, local_device_sm, resolve_target
from .load import verify_files
from .manifest import (
    CAPABILITY_NAME,
    ENGINE_NAME,
    LOG_NAME,
    MANIFEST_NAME,
    EngineManifest,
    read_manifest,
    write_manifest,
)
from .prepare import PLUGIN, CapabilityReport, ParsedNetwork, capability_report, network_from_onnx
from .profiles import (
    DEFAULT_MAX_BATCH,
    PROFILE_NAMES,
    ProfileLimits,
    ShapeProfile,
    derive_profiles,
    tokens_per_step,
)
from .progress import MemoryUsage, PeakRss, build_progress, spinner
from .seam import (
    KernelsFile,
    PluginStatus,
    TrtFlavour,
    choose_flavour,
    first_line,
    installed_flavours,
    load_trt,
    register,
)

T = TypeVar("T")
log = logging.getLogger("gemma4_compile.engines")

HW_COMPAT = ("auto", "none", "same_cc", "ampere_plus")


@dataclass(frozen=True)
class BuildOptions:
    """Everything a build takes besides the export and the targets; the CLI's `build` constructs one."""

    plugins: bool = False  # register gemma4 plugins (else the ONNX function bodies are inlined)
    opt_level: int = 3  # builder optimization level 0..5
    max_batch: int = DEFAULT_MAX_BATCH  # largest batch of every profile
    max_seq: int | None = None  # longest prefill and global cache; None: the export's max_seq_len
    profiles: tuple[str, ...] = PROFILE_NAMES  # 'prefill': sequence 1..max_seq, 'decode': sequence 1
    # full TensorRT only. auto: same_cc (runs on every GPU of the target SM) unless plugins are registered,
    # which may not declare hardware compatibility; TensorRT-RTX has no such setting.
    hardware_compat: str = "auto"
    timing_cache_dir: Path | None = None  # None: OUT/engines/timing-cache
    progress: bool = True  # draw TensorRT's build phases on stderr
    force: bool = (
        False  # rebuild even when an up-to-date engine (same export, TensorRT, target, options) exists
    )
    flavour: str | None = (
        None  # 'tensorrt' | 'tensorrt_rtx'; None: full TensorRT on its own GPU, else RTX AOT
    )

    def __post_init__(self) -> None:
        if not 0 <= self.opt_level <= 5:
            raise BuildError(f"opt_level must be in 0..5, got {self.opt_level}")
        if self.hardware_compat not in HW_COMPAT:
            raise BuildError(
                f"hardware_compat must be one of {', '.join(HW_COMPAT)}, got {self.hardware_compat!r}"
            )
        object.__setattr__(self, "profiles", tuple(self.profiles))

    @property
    def limits(self) -> ProfileLimits:
        return ProfileLimits(self.max_batch, self.max_seq, self.profiles)


@dataclass(frozen=True)
class EngineArtifact:
    target: str
    dir: Path
    engine_path: Path
    manifest_path: Path
    capability_path: Path
    manifest: EngineManifest
    reused: bool  # True: an up-to-date build was found and nothing was rebuilt

    @classmethod
    def of(cls, final: Path, manifest: EngineManifest, reused: bool) -> EngineArtifact:
        return cls(
            manifest.target,
            final,
            final / manifest.engine_file,
            final / MANIFEST_NAME,
            final / CAPABILITY_NAME,
            manifest,
            reused,
        )


# ----- the build record ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanFile:
    path: Path
    sha256: str  # computed while TensorRT streamed the plan to disk: the engine is never hashed again
    bytes: int


@dataclass(frozen=True)
class TimingCache:
    path: Path | None  # None: the flavour has no timing cache (TensorRT-RTX)
    loaded_bytes: int = 0  # size of the cache reused from an earlier build, 0 if fresh

    def to_dict(self) -> dict:
        if self.path is None:
            return {"used": False, "reason": "TensorRT-RTX: timing cache operations are no-ops"}
        return {"used": True, "path": str(self.path), "reused_bytes": self.loaded_bytes}


@dataclass
class BuildRecord:
    """One target's build, filled in as it runs; `manifest()` turns it into manifest.json."""

    export: ExportManifest
    target: GpuTarget
    flavour: TrtFlavour
    options: BuildOptions
    profiles: tuple[ShapeProfile, ...]
    kernels: KernelsFile
    key: str = ""
    plugins: PluginStatus | None = None
    parsed: ParsedNetwork | None = None
    report: CapabilityReport | None = None
    hardware_compat: str = "n/a"  # what was set: none | same_cc | ampere_plus | n/a (RTX)
    timing_cache: TimingCache = TimingCache(None)
    plan: PlanFile | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    memory: MemoryUsage | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # written file -> {"sha256", "bytes"}
    device_memory: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> Path:
        return self.export.path / "engines" / self.target.name

    def write(self, directory: Path, name: str, data: str) -> None:
        """Write a small file and record its fingerprint from the bytes in hand."""
        raw = data.encode()
        (directory / name).write_bytes(raw)
        self.files[name] = {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}

    def build_key(self) -> str:
        """Fingerprint of everything that determines the engine; equal keys mean a rebuild would be redundant."""
        o = self.options
        request = {
            "export": self.export.sha256,
            "target": self.target.name,
            "flavour": self.flavour.name,
            "trt": self.flavour.version,
            "profiles": [p.to_dict() for p in self.profiles],
            "opt_level": o.opt_level,
            "plugins": o.plugins,
            "hardware_compat": o.hardware_compat,
            "kernels": self.kernels.sha256 if o.plugins else None,
        }
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()

    def manifest(self) -> EngineManifest:
        assert self.parsed and self.plan and self.plugins and self.report, (
            "manifest() before the build finished"
        )
        files = {ENGINE_NAME: {"sha256": self.plan.sha256, "bytes": self.plan.bytes}, **self.files}
        return EngineManifest(
            target=self.target.name,
            sm=self.target.sm,
            flavour=self.flavour.name,
            trt_version=self.flavour.version,
            precision=self.export.dtype,
            weight_format=self.export.weight_format,
            device_memory=self.device_memory,
            export_sha256=self.export.sha256,
            decoder_sha256=self.export.graphs[DECODER].sha256,
            profiles=self.profiles,
            opt_level=self.options.opt_level,
            hardware_compat=self.hardware_compat,
            plugins=self.plugins.to_dict(),
            capability=self.report.counts(),
            timing_cache=self.timing_cache.to_dict(),
            build_seconds=round(self.seconds["total"], 3),
            phase_seconds={k: round(v, 3) for k, v in self.seconds.items()},
            memory=self.memory.to_dict() if self.memory else {},
            io=_io(self.parsed),
            files=files,
            tools={
                "gemma4_compile": __version__,
                "onnx": onnx.__version__,
                "python": platform.python_version(),
                "host": platform.node(),
                "build_key": self.key,
            },
            created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )


def _io(parsed: ParsedNetwork) -> tuple[dict, ...]:
    net = parsed.network
    tensors = [("input", net.get_input(i)) for i in range(net.num_inputs)]
    tensors += [("output", net.get_output(i)) for i in range(net.num_outputs)]
    return tuple(
        {"name": t.name, "mode": mode, "dtype": t.dtype.name, "shape": list(t.shape)} for mode, t in tensors
    )


# ----- builder config -----------------------------------------------------------------------------------


def _check_inputs(parsed: ParsedNetwork, profiles: tuple[ShapeProfile, ...]) -> None:
    net = parsed.network
    inputs = {net.get_input(i).name: tuple(net.get_input(i).shape) for i in range(net.num_inputs)}
    for profile in profiles:
        named = {s.name for s in profile.inputs}
        if named != set(inputs):
            missing, extra = sorted(set(inputs) - named), sorted(named - set(inputs))
            raise BuildError(
                f"decoder inputs and export.json disagree: not in export.json {missing}, "
                f"not in decoder.onnx {extra}"
            )
        for s in profile.inputs:
            fixed = inputs[s.name]
            if len(fixed) != len(s.max):
                raise BuildError(
                    f"decoder input {s.name!r}: rank {len(fixed)} in the graph, {len(s.max)} in export.json"
                )
            for axis, dim in enumerate(fixed):
                if dim >= 0 and not s.min[axis] == s.opt[axis] == s.max[axis] == dim:
                    raise BuildError(
                        f"decoder input {s.name!r} axis {axis} is fixed to {dim} in the graph, but the "
                        f"{profile.name} profile asks {s.min[axis]}..{s.max[axis]}"
                    )


def _add_profiles(parsed: ParsedNetwork, config: Any, profiles: tuple[ShapeProfile, ...]) -> None:
    _check_inputs(parsed, profiles)
    for profile in profiles:
        p = parsed.builder.create_optimization_profile()
        for s in profile.inputs:
            p.set_shape(s.name, s.min, s.opt, s.max)
        if config.add_optimization_profile(p) < 0:
            raise BuildError(f"TensorRT refused the {profile.name} optimization profile: {profile.to_dict()}")


def _hardware_compat(flavour: TrtFlavour, config: Any, options: BuildOptions, plugins_used: bool) -> str:
    if flavour.is_rtx:
        return "n/a"
    level = options.hardware_compat
    if level == "auto":
        level = "none" if plugins_used else "same_cc"
    enum = flavour.module.HardwareCompatibilityLevel
    config.hardware_compatibility_level = {
        "none": enum.NONE,
        "same_cc": enum.SAME_COMPUTE_CAPABILITY,
        "ampere_plus": enum.AMPERE_PLUS,
    }[level]
    return level


def timing_cache_path(
    export: ExportManifest, options: BuildOptions, flavour: TrtFlavour, target: GpuTarget
) -> Path | None:
    """One cache per (TensorRT flavour+version, SM): tactics timed on one GPU are valid only there."""
    if not flavour.has_timing_cache:
        return None
    cache_dir = options.timing_cache_dir or export.path / "engines" / "timing-cache"
    return cache_dir / f"{flavour.name}-{flavour.version}-{target.name}.cache"


def _timing_cache(config: Any, path: Path | None) -> TimingCache:
    if path is None:
        return TimingCache(None)
    data = path.read_bytes() if path.is_file() else b""
    # ignore_mismatch=False: TensorRT refuses a cache timed on another device; then start a fresh one
    if not config.set_timing_cache(config.create_timing_cache(data), False) and data:
        data = b""
        config.set_timing_cache(config.create_timing_cache(data), False)
    return TimingCache(path, len(data))


def config_from_network(record: BuildRecord) -> Any:
    """An IBuilderConfig for the record's target: SM (AOT for RTX), profiles, optimization level, timing cache;
    records the hardware compatibility and timing cache it set."""
    parsed, flavour = record.parsed, record.flavour
    config = parsed.builder.create_builder_config()
    if flavour.is_rtx:  # compile for the target's SM, not for whatever GPU is (or is not) present
        config.num_compute_capabilities = 1
        if not config.set_compute_capability(flavour.compute_capability(record.target), 0):
            raise BuildError(f"{flavour.title} refused compute capability {record.target.name}")
    config.builder_optimization_level = record.options.opt_level
    _add_profiles(parsed, config, record.profiles)
    plugins_used = record.report.counts().get(PLUGIN, 0) > 0
    record.hardware_compat = _hardware_compat(flavour, config, record.options, plugins_used)
    record.timing_cache = _timing_cache(
        config, timing_cache_path(record.export, record.options, flavour, record.target)
    )
    return config


# ----- the plan -------------------------------------------------------------------------------------------


def _writer(flavour_module: Any, fh, digest):
    class FileWriter(flavour_module.IStreamWriter):
        def __init__(self) -> None:
            flavour_module.IStreamWriter.__init__(self)
            self.written = 0

        def write(self, data) -> int:
            view = memoryview(data)
            fh.write(view)
            digest.update(view)
            self.written += view.nbytes
            return view.nbytes

    return FileWriter()


def engine_from_network(
    parsed: ParsedNetwork, config: Any, path: Path, target_name: str, monitor: Any = None
) -> PlanFile:
    """Build and stream the plan to `path` (a staging path), hashing it on the way; BuildError on failure.

    Streaming (`build_serialized_network_to_stream`) never holds a multi-GB engine twice in host RAM."""
    if monitor is not None:
        config.progress_monitor = monitor
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        if hasattr(parsed.builder, "build_serialized_network_to_stream"):
            writer = _writer(parsed.flavour.module, fh, digest)
            ok = parsed.builder.build_serialized_network_to_stream(parsed.network, config, writer)
            size = writer.written if ok else 0
        else:  # older TensorRT: one in-memory plan
            plan = parsed.builder.build_serialized_network(parsed.network, config)
            view = memoryview(plan) if plan is not None else memoryview(b"")
            fh.write(view)
            digest.update(view)
            ok, size = plan is not None, view.nbytes
    if not ok or size == 0:
        path.unlink(missing_ok=True)
        errors = parsed.logger.errors()
        reason = first_line(errors[0]) if errors else "the builder returned no engine and logged no error"
        raise BuildError(f"{target_name}: {parsed.flavour.title} could not build the engine: {reason}")
    return PlanFile(path, digest.hexdigest(), size)


def device_memory(log_text: str) -> dict[str, Any]:
    """The device memory the engine asks for, as the builder reports it in its log: the largest "Total
    Activation Memory" over the profiles (what one execution context allocates) and "Total Weights Memory".
    Read from the log because reading it from the engine means deserializing the plan, which needs a GPU of
    the target's SM; the builder prints these on CPU-only TensorRT-RTX builds too."""
    activation = [int(n) for n in _ACTIVATION.findall(log_text)]
    weights = [int(n) for n in _WEIGHTS.findall(log_text)]
    if not activation:
        return {"activation_bytes": None, "weights_bytes": None, "how": "not in the builder's log"}
    return {
        "activation_bytes": max(activation),
        "weights_bytes": weights[-1] if weights else None,
        "how": "the builder's log: largest Total Activation Memory over the profiles, Total Weights Memory",
    }


_ACTIVATION = re.compile(r"Total Activation Memory: (\d+) bytes")
_WEIGHTS = re.compile(r"Total Weights Memory: (\d+) bytes")


def _save_timing_cache(record: BuildRecord, config: Any) -> None:
    """Write the (possibly grown) timing cache back for the next build of this target."""
    if record.timing_cache.path is not None:
        write_atomic(record.timing_cache.path, bytes(memoryview(config.get_timing_cache().serialize())))


# ----- one target ---------------------------------------------------------------------------------------


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


def _fail(record: BuildRecord, message: str) -> BuildError:
    """Publish the failure report to <sm>.failed/ and return the one-line error that points at it."""
    failed = record.final.with_name(f"{record.final.name}.failed")
    with atomic_directory(failed, BuildError, force=True, marker="engine-failure") as tmp:
        (tmp / CAPABILITY_NAME).write_text(json.dumps(record.report.to_dict(), indent=2) + "\n")
        (tmp / LOG_NAME).write_text(record.parsed.logger.text())
    return BuildError(f"{message} (report: {failed / CAPABILITY_NAME})")


def _parse(record: BuildRecord) -> None:
    export, target, flavour = record.export, record.target, record.flavour
    with spinner(
        f"{target.name}: parsing {export.graphs[DECODER].file} with {flavour.title}", record.options.progress
    ):
        record.parsed = network_from_onnx(export, flavour, tokens_per_step(record.profiles))
    record.report = capability_report(target.name, export, record.parsed, record.plugins)
    if not record.parsed.ok:
        rejected = record.report.rejected
        more = f" and {len(rejected) - 1} more" if len(rejected) > 1 else ""
        raise _fail(record, f"{target.name}: {flavour.title} rejected {rejected[0].one_line()}{more}")


def _build_into(record: BuildRecord, staging: Path) -> None:
    t0 = time.perf_counter()
    _parse(record)
    config = config_from_network(record)
    t1 = time.perf_counter()
    with build_progress(record.flavour, f"{record.target.name}:", record.options.progress) as monitor:
        try:
            record.plan = engine_from_network(
                record.parsed, config, staging / ENGINE_NAME, record.target.name, monitor
            )
        except BuildError as e:
            raise _fail(record, str(e)) from None
    _save_timing_cache(record, config)
    t2 = time.perf_counter()
    record.seconds = {"total": t2 - t0, "parse": t1 - t0, "build": t2 - t1}


def build_engine(
    export: ExportManifest,
    target: GpuTarget,
    flavour: TrtFlavour,
    options: BuildOptions,
    kernels: KernelsFile | None = None,
) -> EngineArtifact:
    """Build (or reuse, unless `options.force`) the engine of one target; BuildError says what went wrong.
    `kernels`: the export's kernels.json, when the caller has fingerprinted it already."""
    kernels = kernels or KernelsFile.find(export.path)
    record = BuildRecord(export, target, flavour, options, derive_profiles(export, options.limits), kernels)
    record.key = record.build_key()
    existing = None if options.force else _up_to_date(record.final, record.key)
    if existing is not None:
        log.info("%s: up to date (%s)", target.name, record.final)
        return EngineArtifact.of(record.final, existing, reused=True)
    _checked(export.check_graph_file, DECODER)
    record.plugins = register(
        flavour, options.plugins, export.path, record.kernels
    )  # raises if --plugins fails
    with atomic_directory(
        record.final, BuildError, force=True
    ) as staging:  # ours: it holds an engine manifest
        with PeakRss() as memory:
            _build_into(record, staging)
        record.memory = memory.usage
        record.device_memory = device_memory(record.parsed.logger.text())
        record.write(staging, CAPABILITY_NAME, json.dumps(record.report.to_dict(), indent=2) + "\n")
        record.write(staging, LOG_NAME, record.parsed.logger.text())
        manifest = record.manifest()
        write_manifest(manifest, staging / MANIFEST_NAME)  # last: a directory with a manifest is complete
    shutil.rmtree(
        record.final.with_name(f"{record.final.name}.failed"), ignore_errors=True
    )  # a stale failure
    return EngineArtifact.of(record.final, manifest, reused=False)


# ----- several targets ------------------------------------------------------------------------------------


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


def plan_builds(
    targets: list[str], flavour: str | None = None, device_sm: int | None = None
) -> tuple[tuple[GpuTarget, TrtFlavour], ...]:
    """Pick the TensorRT for every target before building anything, so an unbuildable target fails fast."""
    resolved = resolve_targets(targets)
    flavours = (load_trt(flavour),) if flavour else installed_flavours()
    if not flavours:
        load_trt()  # raises the "no TensorRT is installed" error
    return tuple((t, choose_flavour(t, flavours, device_sm)) for t in resolved)


def read_export(export_dir: str | Path) -> ExportManifest:
    """OUT/export.json as a build needs it: lenient (exports of graphs this tool did not write build too), with a
    decoder graph; a BuildError names the first problem."""
    export = _checked(ExportManifest.load, export_dir, lenient=True)
    if DECODER not in export.graphs:
        raise BuildError(
            f"{export.path / 'export.json'} has no graphs.{DECODER}; re-run gemma4-compile export"
        )
    _checked(export.verify)  # hashes of every graph and weight file, export.json's seal and consistency
    if export.quant is not None and export.quant.graph == GRAPH_NBITS:  # onnxruntime's contrib op
        raise BuildError(
            f"{export.path} is a {export.weight_format} export for onnxruntime (com.microsoft.MatMulNBits); "
            f"for TensorRT export with --dtype bf16 or fp16 --quant {export.quant.format} (DequantizeLinear)"
        )
    return export


def _check_weight_formats(export: ExportManifest, targets: list[GpuTarget]) -> None:
    """fp8 needs sm89+, nvfp4 sm120+ (quant/formats.py MIN_SM): refused in one line before any build."""
    if export.quant is None:
        return
    for target in targets:
        if target.sm < export.quant.min_sm:
            needs = {
                f: MIN_SM[f] for f in sorted(export.quant.formats) if f in MIN_SM and target.sm < MIN_SM[f]
            }
            fmt, sm = next(iter(needs.items()))
            raise BuildError(
                f"{target.name} cannot run {fmt} weights (TensorRT has {fmt} from sm{sm}); build this export "
                f"for sm{sm} or newer, or export with --quant int4|int8"
            )


def _checked(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return fn(*args, **kwargs)
    except ExportError as e:
        raise BuildError(str(e)) from None


def build_engines(
    export_dir: str | Path, targets: list[str], options: BuildOptions | None = None, **overrides: Any
) -> list[EngineArtifact]:
    """Build one engine per target from OUT/export.json into OUT/engines/<sm>/.

    targets: SM names ('sm89'), GPU names ('l40s', 'h200') or 'native'. Every target is checked against the
        installed TensorRT before any build starts; an unbuildable one raises a one-line BuildError.
    options: BuildOptions (defaults when None); keyword `overrides` replace its fields
        (`build_engines(out, ["sm89"], max_batch=1)`).
    """
    options = dataclasses.replace(options or BuildOptions(), **overrides)
    export = read_export(export_dir)  # the one read of export.json for a build
    _check_weight_formats(export, resolve_targets(targets))
    plan = plan_builds(targets, options.flavour, local_device_sm())
    kernels = KernelsFile.find(export.path)  # hashed once for all targets
    return [build_engine(export, target, flavour, options, kernels) for target, flavour in plan]
