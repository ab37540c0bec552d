"""Build one engine per graph and target: export.json -> per graph: parsed network -> builder config ->
serialized plan; then one manifest per target.

Output: OUT/engines/<sm>/{decoder.engine, capability.json, build.log, embed.engine, embed.capability.json,
embed.build.log, vision.*, audio.*, manifest.json} (the graphs the export has, or `BuildOptions.graphs`),
written into a temporary directory that replaces the final one only when every graph is built
(fsutil.atomic_directory), manifest last. Every graph goes through the same path (`_build_graph`). A failed
build leaves its report in OUT/engines/<sm>.failed/ and never touches an existing good build. Precision is never
set here: networks are strongly typed, so the ONNX dtypes (fp32 islands of half-precision graphs included)
are the engine's dtypes.
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
from ..dtypes import DType
from ..errors import BuildError, ExportError
from ..export.manifest import DECODER, ExportManifest
from ..fsutil import atomic_directory, write_atomic
from ..quant.formats import GRAPH_NBITS, MIN_SM
from ..targets import GpuTarget, local_device_sm, resolve_target
from .load import verify_files
from .manifest import (
    MANIFEST_NAME,
    EngineManifest,
    GraphEngine,
    graph_files,
    read_manifest,
    write_manifest,
)
from .prepare import (
    PLUGIN,
    CapabilityReport,
    ParsedNetwork,
    capability_report,
    fp32_layers,
    network_from_onnx,
)
from .profiles import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CLIPS,
    MAX_FRAMES,
    PROFILE_NAMES,
    ProfileLimits,
    ShapeProfile,
    derive_profiles,
    engine_roles,
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
    graphs: tuple[str, ...] | None = (
        None  # roles to build ('decoder', 'embed', ...); None: all the export has
    )
    max_images: int | None = None  # images per vision call; None: export.json multimodal.max_images (8)
    max_image_tokens: int | None = None  # soft tokens per image; None: the vision spec's default (280)
    max_clips: int = DEFAULT_MAX_CLIPS  # audio clips per audio call
    max_frames: int = MAX_FRAMES  # log-mel frames per clip (3000 = 30 s, the audio graph's bound)

    def __post_init__(self) -> None:
        if not 0 <= self.opt_level <= 5:
            raise BuildError(f"opt_level must be in 0..5, got {self.opt_level}")
        if self.hardware_compat not in HW_COMPAT:
            raise BuildError(
                f"hardware_compat must be one of {', '.join(HW_COMPAT)}, got {self.hardware_compat!r}"
            )
        object.__setattr__(self, "profiles", tuple(self.profiles))
        if self.graphs is not None:
            object.__setattr__(self, "graphs", tuple(self.graphs))

    @property
    def limits(self) -> ProfileLimits:
        return ProfileLimits(
            self.max_batch,
            self.max_seq,
            self.profiles,
            self.max_images,
            self.max_image_tokens,
            self.max_clips,
            self.max_frames,
        )


@dataclass(frozen=True)
class EngineArtifact:
    """One target's directory: an engine per graph (`engine_paths`), the decoder's first."""

    target: str
    dir: Path
    engine_paths: dict[str, Path]  # role -> engine file
    manifest_path: Path
    capability_path: Path  # the decoder's (or the first graph's) capability report
    manifest: EngineManifest
    reused: bool  # True: an up-to-date build was found and nothing was rebuilt

    @property
    def engine_path(self) -> Path:
        """The decoder's engine, or the first graph's when the build left the decoder out."""
        return self.engine_paths.get(DECODER) or next(iter(self.engine_paths.values()))

    @classmethod
    def of(cls, final: Path, manifest: EngineManifest, reused: bool) -> EngineArtifact:
        paths = {role: final / g.engine_file for role, g in manifest.graphs.items()}
        first = DECODER if DECODER in manifest.graphs else next(iter(manifest.graphs))
        return cls(
            manifest.target,
            final,
            paths,
            final / MANIFEST_NAME,
            final / graph_files(first)[1],
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
class GraphRecord:
    """One graph's build inside a target's build (BuildRecord), filled in as it runs."""

    role: str
    profiles: tuple[ShapeProfile, ...]
    parsed: ParsedNetwork | None = None  # released once the plan is written
    report: CapabilityReport | None = None
    hardware_compat: str = "n/a"  # what was set: none | same_cc | ampere_plus | n/a (RTX)
    plan: PlanFile | None = None
    io: tuple[dict, ...] = ()
    fp32_layers: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    device_memory: dict[str, Any] = field(default_factory=dict)

    def engine(self, export: ExportManifest) -> GraphEngine:
        assert self.plan and self.report, "engine() before the graph was built"
        spec = export.graphs[self.role]
        return GraphEngine(
            role=self.role,
            onnx_file=spec.file,
            onnx_sha256=spec.sha256,
            engine_file=graph_files(self.role)[0],
            profiles=self.profiles,
            capability=self.report.counts(),
            io=self.io,
            build_seconds=round(self.seconds["total"], 3),
            phase_seconds={k: round(v, 3) for k, v in self.seconds.items()},
            device_memory=self.device_memory,
            fp32_layers=self.fp32_layers,
        )


@dataclass
class BuildRecord:
    """One target's build (one engine per graph), filled in as it runs; `manifest()` turns it into
    manifest.json."""

    export: ExportManifest
    target: GpuTarget
    flavour: TrtFlavour
    options: BuildOptions
    graphs: tuple[GraphRecord, ...]
    kernels: KernelsFile
    key: str = ""
    plugins: PluginStatus | None = None
    timing_cache: TimingCache = TimingCache(None)
    seconds: float = 0.0  # every graph together
    memory: MemoryUsage | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # written file -> {"sha256", "bytes"}

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
            "profiles": {g.role: [p.to_dict() for p in g.profiles] for g in self.graphs},
            "opt_level": o.opt_level,
            "plugins": o.plugins,
            "hardware_compat": o.hardware_compat,
            "kernels": self.kernels.sha256 if o.plugins else None,
        }
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()

    def manifest(self) -> EngineManifest:
        assert self.plugins, "manifest() before the build finished"
        engines = {
            g.engine(self.export).engine_file: {"sha256": g.plan.sha256, "bytes": g.plan.bytes}
            for g in self.graphs
        }
        return EngineManifest(
            target=self.target.name,
            sm=self.target.sm,
            flavour=self.flavour.name,
            trt_version=self.flavour.version,
            precision=self.export.dtype,
            weight_format=self.export.weight_format,
            export_sha256=self.export.sha256,
            graphs={g.role: g.engine(self.export) for g in self.graphs},
            opt_level=self.options.opt_level,
            # one level per target unless graphs differ (plugins in one graph only): then each, joined
            hardware_compat=", ".join(sorted({g.hardware_compat for g in self.graphs})),
            plugins=self.plugins.to_dict(),
            timing_cache=self.timing_cache.to_dict(),
            build_seconds=round(self.seconds, 3),
            memory=self.memory.to_dict() if self.memory else {},
            files={**engines, **self.files},
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


def _check_inputs(parsed: ParsedNetwork, profiles: tuple[ShapeProfile, ...], role: str) -> None:
    net = parsed.network
    inputs = {net.get_input(i).name: tuple(net.get_input(i).shape) for i in range(net.num_inputs)}
    for profile in profiles:
        named = {s.name for s in profile.inputs}
        if named != set(inputs):
            missing, extra = sorted(set(inputs) - named), sorted(named - set(inputs))
            raise BuildError(
                f"{role} inputs and export.json disagree: not in export.json {missing}, "
                f"not in {role}.onnx {extra}"
            )
        for s in profile.inputs:
            fixed = inputs[s.name]
            if len(fixed) != len(s.max):
                raise BuildError(
                    f"{role} input {s.name!r}: rank {len(fixed)} in the graph, {len(s.max)} in export.json"
                )
            for axis, dim in enumerate(fixed):
                if dim >= 0 and not s.min[axis] == s.opt[axis] == s.max[axis] == dim:
                    raise BuildError(
                        f"{role} input {s.name!r} axis {axis} is fixed to {dim} in the graph, but the "
                        f"{profile.name} profile asks {s.min[axis]}..{s.max[axis]}"
                    )


def _add_profiles(parsed: ParsedNetwork, config: Any, profiles: tuple[ShapeProfile, ...], role: str) -> None:
    _check_inputs(parsed, profiles, role)
    for profile in profiles:
        p = parsed.builder.create_optimization_profile()
        for s in profile.inputs:
            p.set_shape(s.name, s.min, s.opt, s.max)
        if config.add_optimization_profile(p) < 0:
            raise BuildError(
                f"TensorRT refused the {role} {profile.name} optimization profile: {profile.to_dict()}"
            )


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


def config_from_network(record: BuildRecord, graph: GraphRecord) -> Any:
    """An IBuilderConfig for one graph of the record's target: SM (AOT for RTX), the graph's profiles,
    optimization level, timing cache; records the hardware compatibility and timing cache it set."""
    parsed, flavour = graph.parsed, record.flavour
    config = parsed.builder.create_builder_config()
    if flavour.is_rtx:  # compile for the target's SM, not for whatever GPU is (or is not) present
        config.num_compute_capabilities = 1
        if not config.set_compute_capability(flavour.compute_capability(record.target), 0):
            raise BuildError(f"{flavour.title} refused compute capability {record.target.name}")
    config.builder_optimization_level = record.options.opt_level
    _add_profiles(parsed, config, graph.profiles, graph.role)
    plugins_used = graph.report.counts().get(PLUGIN, 0) > 0
    graph.hardware_compat = _hardware_compat(flavour, config, record.options, plugins_used)
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


def _label(record: BuildRecord, graph: GraphRecord) -> str:
    return f"{record.target.name} {graph.role}"


def _fail(record: BuildRecord, graph: GraphRecord, message: str) -> BuildError:
    """Publish the failing graph's report to <sm>.failed/ and return the one-line error that points at it."""
    failed = record.final.with_name(f"{record.final.name}.failed")
    _, capability_name, log_name = graph_files(graph.role)
    with atomic_directory(failed, BuildError, force=True, marker="engine-failure") as tmp:
        (tmp / capability_name).write_text(json.dumps(graph.report.to_dict(), indent=2) + "\n")
        (tmp / log_name).write_text(graph.parsed.logger.text())
    return BuildError(f"{message} (report: {failed / capability_name})")


def _parse(record: BuildRecord, graph: GraphRecord) -> None:
    export, target, flavour, label = record.export, record.target, record.flavour, _label(record, graph)
    hint = tokens_per_step(graph.profiles) if graph.role == DECODER else 1  # MoE tiles: decoder only
    with spinner(
        f"{label}: parsing {export.graphs[graph.role].file} with {flavour.title}", record.options.progress
    ):
        graph.parsed = network_from_onnx(export, flavour, hint, graph.role)
    graph.report = capability_report(target.name, export, graph.parsed, record.plugins, graph.role)
    if not graph.parsed.ok:
        rejected = graph.report.rejected
        more = f" and {len(rejected) - 1} more" if len(rejected) > 1 else ""
        raise _fail(record, graph, f"{label}: {flavour.title} rejected {rejected[0].one_line()}{more}")


def _build_graph(record: BuildRecord, graph: GraphRecord, staging: Path) -> None:
    """Parse, configure and build one graph into `staging`, then write its capability report and build log."""
    t0 = time.perf_counter()
    _parse(record, graph)
    config = config_from_network(record, graph)
    t1 = time.perf_counter()
    engine_name, capability_name, log_name = graph_files(graph.role)
    label = _label(record, graph)
    with build_progress(record.flavour, f"{label}:", record.options.progress) as monitor:
        try:
            graph.plan = engine_from_network(graph.parsed, config, staging / engine_name, label, monitor)
        except BuildError as e:
            raise _fail(record, graph, str(e)) from None
    _save_timing_cache(record, config)
    t2 = time.perf_counter()
    graph.seconds = {"total": t2 - t0, "parse": t1 - t0, "build": t2 - t1}
    log_text = graph.parsed.logger.text()
    graph.device_memory = device_memory(log_text)
    graph.io, graph.fp32_layers = _io(graph.parsed), fp32_layers(graph.parsed)
    _check_fp32_islands(record, graph)
    record.write(staging, capability_name, json.dumps(graph.report.to_dict(), indent=2) + "\n")
    record.write(staging, log_name, log_text)
    graph.parsed = None  # the network and builder of a large graph need not outlive its plan


def _check_fp32_islands(record: BuildRecord, graph: GraphRecord) -> None:
    """A half-precision graph whose ONNX computes parts in fp32 must keep them in the network: refuse a
    network with no fp32 layer at all (a pass or parser setting that cast the islands away)."""
    marked = graph.parsed.edits.fp32_nodes
    if record.export.activation_dtype in (DType.FP16, DType.BF16) and marked and not graph.fp32_layers:
        raise _fail(
            record,
            graph,
            f"{_label(record, graph)}: {graph.role}.onnx computes {marked} nodes in fp32, the parsed network "
            "none; the fp32 islands were dropped",
        )


def build_engine(
    export: ExportManifest,
    target: GpuTarget,
    flavour: TrtFlavour,
    options: BuildOptions,
    kernels: KernelsFile | None = None,
) -> EngineArtifact:
    """Build (or reuse, unless `options.force`) the engines of one target, one per graph of
    `options.graphs` (default: every graph of the export); BuildError says what went wrong.
    `kernels`: the export's kernels.json, when the caller has fingerprinted it already."""
    kernels = kernels or KernelsFile.find(export.path)
    roles = engine_roles(export, options.graphs)
    graphs = tuple(GraphRecord(role, derive_profiles(export, options.limits, role)) for role in roles)
    record = BuildRecord(export, target, flavour, options, graphs, kernels)
    record.key = record.build_key()
    existing = None if options.force else _up_to_date(record.final, record.key)
    if existing is not None:
        log.info("%s: up to date (%s)", target.name, record.final)
        return EngineArtifact.of(record.final, existing, reused=True)
    for role in roles:
        _checked(export.check_graph_file, role)
    record.plugins = register(
        flavour, options.plugins, export.path, record.kernels
    )  # raises if --plugins fails
    with atomic_directory(
        record.final, BuildError, force=True
    ) as staging:  # ours: it holds an engine manifest
        t0 = time.perf_counter()
        with PeakRss() as memory:
            for graph in graphs:
                _build_graph(record, graph, staging)
        record.seconds, record.memory = time.perf_counter() - t0, memory.usage
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
