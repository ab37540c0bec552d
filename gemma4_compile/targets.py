"""GPU targets: one table from SM and GPU names to compute capability and limits.

Shared-memory figures are the per-block opt-in maxima from the CUDA programming guide's
compute-capability tables; kernels and engine builds check their variants against them.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from dataclasses import dataclass

from .errors import Gemma4CompileError


@dataclass(frozen=True)
class GpuTarget:
    name: str  # canonical SM name, e.g. "sm90"
    major: int
    minor: int
    max_shared_bytes: int  # per block, opt-in
    gpus: tuple[str, ...]  # product names that resolve to this SM

    @property
    def sm(self) -> int:
        return self.major * 10 + self.minor

    @property
    def cc(self) -> str:
        return f"{self.major}.{self.minor}"

    @property
    def supports_bf16(self) -> bool:
        return self.major >= 8  # bf16 tensor cores arrived with Ampere

    def describe(self) -> str:
        """'sm90 (h100, h200, ...)' for messages."""
        return f"{self.name} ({', '.join(self.gpus)})" if self.gpus else self.name


TARGETS: dict[str, GpuTarget] = {
    t.name: t
    for t in (
        GpuTarget("sm75", 7, 5, 64 * 1024, ("t4", "rtx2080", "rtx2080ti", "quadro-rtx-6000")),
        GpuTarget("sm80", 8, 0, 163 * 1024, ("a100", "a30", "a800")),
        GpuTarget(
            "sm86", 8, 6, 99 * 1024, ("a10", "a10g", "a40", "a6000", "rtx3090", "rtx3080", "rtx-a6000")
        ),
        GpuTarget("sm89", 8, 9, 99 * 1024, ("l4", "l40", "l40s", "rtx4090", "rtx4080", "rtx-6000-ada")),
        GpuTarget("sm90", 9, 0, 227 * 1024, ("h100", "h200", "h800", "gh200")),
        GpuTarget("sm100", 10, 0, 227 * 1024, ("b200", "b100", "gb200")),
        GpuTarget("sm120", 12, 0, 99 * 1024, ("rtx5090", "rtx5080", "rtx-pro-6000")),
        GpuTarget("sm121", 12, 1, 99 * 1024, ("dgx-spark", "gb10")),
    )
}

GPU_NAMES: dict[str, str] = {gpu: t.name for t in TARGETS.values() for gpu in t.gpus}


def target_for_sm(sm: int) -> GpuTarget | None:
    """89 -> the sm89 target; None if the table has no such SM."""
    return next((t for t in TARGETS.values() if t.sm == sm), None)


@functools.cache
def local_target() -> GpuTarget | None:
    """`native_target()`, or None without a known local GPU; asked once per process (the kernels' torch wrappers
    pick tiles on every call, and each driver query loads libcuda and calls cuInit)."""
    try:
        return native_target()
    except Gemma4CompileError:
        return None


def resolve_target(name: str) -> GpuTarget:
    """'sm90', 'h200', 'H200' or 'native' (the GPU on this machine) -> GpuTarget."""
    key = name.strip().lower()
    if key == "native":
        return native_target()
    key = GPU_NAMES.get(key, key.replace("sm_", "sm"))
    if key not in TARGETS:
        known = ", ".join([*TARGETS, *GPU_NAMES, "native"])
        raise Gemma4CompileError(f"unknown GPU target {name!r}; known targets: {known}")
    return TARGETS[key]


def local_device_sm() -> int | None:
    """Compute capability of this machine's first CUDA GPU as an int (90 for 9.0), or None without one.

    Asks the CUDA driver (libcuda, through ctypes), never TensorRT: a TensorRT runtime created without a usable
    GPU can segfault. Nor torch: what runs an export must not import it (docs/architecture.md).
    """
    try:
        cuda = ctypes.CDLL("libcuda.so.1" if sys.platform != "win32" else "nvcuda.dll")
    except OSError:
        return None
    count, device, major, minor = (ctypes.c_int() for _ in range(4))
    ok = (
        cuda.cuInit(0) == 0
        and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0
        and count.value > 0
        and cuda.cuDeviceGet(ctypes.byref(device), 0) == 0
        and cuda.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, device) == 0
        and cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, device) == 0
    )
    return major.value * 10 + minor.value if ok else None


_CC_MAJOR, _CC_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR (cuda.h)


def native_target() -> GpuTarget:
    sm = local_device_sm()
    if sm is None:
        raise Gemma4CompileError("target 'native' needs a CUDA GPU on this machine, and none was found")
    target = target_for_sm(sm)
    if target is None:
        raise Gemma4CompileError(
            f"the local GPU (compute capability {sm // 10}.{sm % 10}) is not a known target"
        )
    return target
