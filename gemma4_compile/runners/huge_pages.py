"""Back the memory onnxruntime allocates for a session's weights with transparent huge pages (Linux).

A decode step streams every weight from DRAM once; on 4 KiB pages that is a TLB miss every 4 KiB. Kernels set
transparent huge pages to `madvise` by default, and onnxruntime never asks, so its weight buffers (initializers,
prepacked copies) stay on small pages. `HugePages` remembers the anonymous mappings of the process before the
sessions are made; `apply` advises the ones made since (MADV_HUGEPAGE) and collapses up to COLLAPSE_BUDGET of them
into 2 MiB pages now (MADV_COLLAPSE, Linux 6.1+; the rest, or everything on older kernels, the kernel's khugepaged
collapses over time). Decode steps of the mid configs got 7-16 % faster (benchmarks/RESULTS.md, eighth session).
Nothing changes where the kernel or the platform says no: `apply` returns the reason.
"""

from __future__ import annotations

import ctypes
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HugePages", "Outcome", "anonymous_ranges", "available_memory", "new_ranges", "unavailable"]

PAGE = 2 << 20  # x86-64 and arm64 transparent huge page
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
MAPS = Path("/proc/self/maps")
MEMINFO = Path("/proc/meminfo")
ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# bytes collapsed at load; the rest is only advised (new faults get huge pages, khugepaged collapses the rest over
# time): MADV_COLLAPSE copies at ~0.4 GB/s here, so a 31B-sized model would otherwise add tens of seconds to a start
COLLAPSE_BUDGET = 1 << 30

Range = tuple[int, int]  # [start, end) in bytes


@dataclass(frozen=True)
class Outcome:
    advised: int = 0  # bytes advised
    collapsed: int = 0  # of those, bytes on huge pages now
    seconds: float = 0.0
    reason: str = ""  # why nothing was advised, if so

    def __str__(self) -> str:
        if self.reason:
            return f"off: {self.reason}"
        mib = 1 << 20
        return f"{self.collapsed // mib} of {self.advised // mib} MiB on 2 MiB pages ({self.seconds:.2f} s)"


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        line = next(x for x in MEMINFO.read_text().splitlines() if x.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def anonymous_ranges(maps: str) -> list[Range]:
    """Private writable anonymous mappings (and the heap) of a /proc/PID/maps text."""
    out = []
    for line in maps.splitlines():
        parts = line.split()
        if len(parts) < 5 or not parts[1].startswith("rw") or parts[1][3] != "p":
            continue
        if len(parts) > 5 and parts[5] != "[heap]":
            continue  # files, stacks, vdso
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.append((lo, hi))
    return out


def new_ranges(before: list[Range], after: list[Range]) -> list[Range]:
    """The parts of `after` no range of `before` covers, each trimmed to whole huge pages (empty ones dropped)."""
    out = []
    for lo, hi in after:
        pieces = [(lo, hi)]
        for b_lo, b_hi in before:
            pieces = [p for a, z in pieces for p in ((a, min(z, b_lo)), (max(a, b_hi), z)) if p[0] < p[1]]
        for a, z in pieces:
            a, z = -(-a // PAGE) * PAGE, z // PAGE * PAGE
            if z > a:
                out.append((a, z))
    return out


def unavailable() -> str:
    """Why this platform gives no transparent huge pages, or ""."""
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    try:
        mode = ENABLED.read_text()
    except OSError:
        return "the kernel has no transparent huge pages"
    return "transparent huge pages are [never] on this kernel" if "[never]" in mode else ""


class HugePages:
    """`HugePages()` before making sessions, `.apply()` after: huge pages for what they allocated."""

    def __init__(self) -> None:
        self._reason = unavailable()
        self._before = [] if self._reason else anonymous_ranges(MAPS.read_text())

    def apply(self) -> Outcome:
        if self._reason:
            return Outcome(reason=self._reason)
        t0 = time.perf_counter()
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        advised = collapsed = 0
        for lo, hi in new_ranges(self._before, anonymous_ranges(MAPS.read_text())):
            if madvise(lo, hi - lo, MADV_HUGEPAGE) != 0:
                continue
            advised += hi - lo
            # synchronous, within the budget; an older kernel (EINVAL) or a busy range leaves it to khugepaged
            if collapsed + hi - lo <= COLLAPSE_BUDGET and madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
                collapsed += hi - lo
        if not advised:
            return Outcome(reason="no new anonymous mapping of 2 MiB or more")
        return Outcome(advised, collapsed, time.perf_counter() - t0)
