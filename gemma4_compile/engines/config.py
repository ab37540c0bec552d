"""Stage 2: builder config derived from (target, options, profiles) (`ConfigFromNetwork`, `config_from_network`).

Precision is never set here: networks are strongly typed, so the ONNX dtypes are the engine's dtypes
(TensorRT 11 and TensorRT-RTX have no fp16/bf16 builder flags at all).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BuildError
from ..targets import GpuTarget
from .network import ParsedNetwork
from .profiles import ProfileLimits, ShapeProfile

HW_COMPAT = ("auto", "none", "same_cc", "ampere_plus")


@dataclass(frozen=True)
class BuildOptions:
    """Everything a build takes besides the export and the target. Defaults are the CLI's defaults."""

    plugins: bool = False  # register gemma4 plugins (else the ONNX function bodies are inlined)
    opt_level: int = 3  # builder optimization level 0..5
    limits: ProfileLimits = field(default_factory=ProfileLimits)
    # full TensorRT only. auto: same_cc (runs on every GPU of the target SM) unless plugins are registered,
    # which may not declare hardware compatibility; TensorRT-RTX has no such setting.
    hardware_compat: str = "auto"
    timing_cache_dir: Path | None = None  # None: OUT/engines/timing-cache
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.opt_level <= 5:
            raise BuildError(f"opt_level must be in 0..5, got {self.opt_level}")
        if self.hardware_compat not in HW_COMPAT:
            raise BuildError(
                f"hardware_compat must be one of {', '.join(HW_COMPAT)}, got {self.hardware_compat!r}"
            )


@dataclass(frozen=True)
class TimingCache:
    path: Path | None  # None: the flavour has no timing cache (TensorRT-RTX)
    loaded_bytes: int = 0  # size of the cache reused from an earlier build, 0 if fresh

    def to_dict(self) -> dict:
        if self.path is None:
            return {"used": False, "reason": "TensorRT-RTX: timing cache operations are no-ops"}
        return {"used": True, "path": str(self.path), "reused_bytes": self.loaded_bytes}


@dataclass(frozen=True)
class BuildConfig:
    config: Any  # IBuilderConfig
    timing_cache: TimingCache
    hardware_compat: str  # what was set: none | same_cc | ampere_plus | n/a (RTX)


def timing_cache_path(cache_dir: Path, parsed: ParsedNetwork, target: GpuTarget) -> Path:
    """One cache per (TensorRT flavour+version, SM): tactics timed on one GPU are valid only there."""
    return cache_dir / f"{parsed.flavour.name}-{parsed.flavour.version}-{target.name}.cache"


def _check_inputs(parsed: ParsedNetwork, profiles: tuple[ShapeProfile, ...]) -> None:
    net = parsed.network
    inputs = {net.get_input(i).name: tuple(net.get_input(i).shape) for i in range(net.num_inputs)}
    for profile in profiles:
        named = {s.name for s in profile.inputs}
        if named != set(inputs):
            missing, extra = sorted(set(inputs) - named), sorted(named - set(inputs))
            raise BuildError(f"decoder inputs and export.json disagree: not in export.json {missing}, "
                             f"not in decoder.onnx {extra}")  # fmt: skip
        for s in profile.inputs:
            fixed = inputs[s.name]
            if len(fixed) != len(s.max):
                raise BuildError(
                    f"decoder input {s.name!r}: rank {len(fixed)} in the graph, {len(s.max)} in export.json"
                )
            for axis, dim in enumerate(fixed):
                if dim >= 0 and not s.min[axis] == s.opt[axis] == s.max[axis] == dim:
                    raise BuildError(f"decoder input {s.name!r} axis {axis} is fixed to {dim} in the graph, but the "
                                     f"{profile.name} profile asks {s.min[axis]}..{s.max[axis]}")  # fmt: skip


def _add_profiles(parsed: ParsedNetwork, config: Any, profiles: tuple[ShapeProfile, ...]) -> None:
    _check_inputs(parsed, profiles)
    for profile in profiles:
        p = parsed.builder.create_optimization_profile()
        for s in profile.inputs:
            p.set_shape(s.name, s.min, s.opt, s.max)
        if config.add_optimization_profile(p) < 0:
            raise BuildError(f"TensorRT refused the {profile.name} optimization profile: {profile.to_dict()}")


def _hardware_compat(parsed: ParsedNetwork, config: Any, options: BuildOptions, plugins_used: bool) -> str:
    if parsed.flavour.is_rtx:
        return "n/a"
    level = options.hardware_compat
    if level == "auto":
        level = "none" if plugins_used else "same_cc"
    enum = parsed.flavour.module.HardwareCompatibilityLevel
    config.hardware_compatibility_level = {"none": enum.NONE, "same_cc": enum.SAME_COMPUTE_CAPABILITY,
                                           "ampere_plus": enum.AMPERE_PLUS}[level]  # fmt: skip
    return level


def _timing_cache(parsed: ParsedNetwork, config: Any, path: Path | None) -> TimingCache:
    if not parsed.flavour.has_timing_cache or path is None:
        return TimingCache(None)
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    # ignore_mismatch=False: TensorRT refuses a cache timed on another device; then start a fresh one
    if not config.set_timing_cache(cache, False) and data:
        data = b""
        config.set_timing_cache(config.create_timing_cache(data), False)
    return TimingCache(path, len(data))


def config_from_network(
    parsed: ParsedNetwork, target: GpuTarget, options: BuildOptions, profiles: tuple[ShapeProfile, ...],
    *, plugins_used: bool = False, timing_cache: Path | None = None,
) -> BuildConfig:  # fmt: skip
    """An IBuilderConfig for one target: SM (AOT for RTX), profiles, optimization level, timing cache."""
    config = parsed.builder.create_builder_config()
    if parsed.flavour.is_rtx:  # compile for the target's SM, not for whatever GPU is (or is not) present
        config.num_compute_capabilities = 1
        if not config.set_compute_capability(parsed.flavour.compute_capability(target), 0):
            raise BuildError(f"{parsed.flavour.title} refused compute capability {target.name}")
    config.builder_optimization_level = options.opt_level
    _add_profiles(parsed, config, profiles)
    hw = _hardware_compat(parsed, config, options, plugins_used)
    return BuildConfig(config, _timing_cache(parsed, config, timing_cache), hw)


class ConfigFromNetwork:
    """Lazy `config_from_network` over a network loader (or a ParsedNetwork)."""

    def __init__(self, network, target: GpuTarget, options: BuildOptions, profiles: tuple[ShapeProfile, ...],
                 **kwargs: Any):  # fmt: skip
        self.network, self.target, self.options, self.profiles, self.kwargs = (
            network,
            target,
            options,
            profiles,
            kwargs,
        )

    def __call__(self) -> tuple[ParsedNetwork, BuildConfig]:
        parsed = self.network() if callable(self.network) else self.network
        return parsed, config_from_network(parsed, self.target, self.options, self.profiles, **self.kwargs)
