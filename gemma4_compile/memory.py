"""Process memory: make glibc hand large freed blocks back to the system.

glibc raises its mmap threshold to the largest block freed so far, so after the first big buffer is freed,
later ones come from the heap and stay resident when freed: the export's read buffers (+125 MiB peak on the
full-size E2B with towers) and a low-memory decode's activation buffers. A fixed threshold keeps every block
above it mmapped and unmapped on free. Imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def map_large_allocations(threshold_bytes: int) -> bool:
    """Blocks above `threshold_bytes` are mmapped and returned when freed (Linux/glibc; elsewhere nothing
    happens). Returns whether it took effect."""
    libc = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(libc), "mallopt", None) if libc else None
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, threshold_bytes))
