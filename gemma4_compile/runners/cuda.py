"""The few CUDA runtime calls the TensorRT runner makes, through ctypes: no torch.

    cuda = cuda_runtime()                    # libcudart, found by polygraphy (CUDA_PATH, nvidia-* wheels, ...)
    stream = cuda.new_stream()
    buf = DeviceArray(cuda, (2, 8), np.float16)
    buf.zero(stream); buf.upload(host, stream); buf.download(out, stream); cuda.synchronize(stream)

polygraphy.cuda locates and loads libcudart, and its DeviceArray does most of this, but it has no memset (zeroed
caches would need a host buffer of the cache's size), cannot hold bf16 as ml_dtypes numpy, and reports errors as
its own exceptions; so the calls are made here through the library handle it loaded. `CudaRuntime` is the seam:
tests put a numpy-backed fake behind DeviceArray (tests/engines/test_trt_runner.py).
"""

from __future__ import annotations

import ctypes
import functools
import weakref
from typing import Any

import numpy as np

from ..errors import BackendUnavailable, RunnerError

_HOST_TO_DEVICE, _DEVICE_TO_HOST, _DEVICE_TO_DEVICE = 1, 2, 3  # cudaMemcpyKind (cuda_runtime_api.h)


class CudaRuntime:
    """libcudart calls on raw addresses (ints); a failing call raises RunnerError naming it."""

    def __init__(self, lib: Any):
        self.lib = lib
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p

    def _check(self, call: str, status: int) -> None:
        if status != 0:
            reason = self.lib.cudaGetErrorString(ctypes.c_int(status)).decode(errors="replace")
            raise RunnerError(f"trt: {call} failed: CUDA error {status} ({reason})")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check("cudaMalloc", self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes)))
        return int(ptr.value or 0)

    def free(self, ptr: int) -> None:
        self._check("cudaFree", self.lib.cudaFree(ctypes.c_void_p(ptr)))

    def memset(self, ptr: int, nbytes: int, stream: int) -> None:
        """Zero `nbytes` at `ptr`, ordered on `stream`."""
        status = self.lib.cudaMemsetAsync(
            ctypes.c_void_p(ptr), ctypes.c_int(0), ctypes.c_size_t(nbytes), ctypes.c_void_p(stream)
        )
        self._check("cudaMemsetAsync", status)

    def to_device(self, ptr: int, host: np.ndarray, stream: int) -> None:
        """Copy a contiguous host array to `ptr` on `stream` (the caller keeps `host` alive until a sync)."""
        self._copy(ptr, host.ctypes.data, host.nbytes, _HOST_TO_DEVICE, stream)

    def to_host(self, host: np.ndarray, ptr: int, stream: int) -> None:
        """Copy `host.nbytes` from `ptr` into a contiguous host array on `stream` (valid after a sync)."""
        self._copy(host.ctypes.data, ptr, host.nbytes, _DEVICE_TO_HOST, stream)

    def copy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Copy `nbytes` between device addresses on `stream`."""
        self._copy(dst, src, nbytes, _DEVICE_TO_DEVICE, stream)

    def _copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        status = self.lib.cudaMemcpyAsync(
            ctypes.c_void_p(dst),
            ctypes.c_void_p(src),
            ctypes.c_size_t(nbytes),
            ctypes.c_int(kind),
            ctypes.c_void_p(stream),
        )
        self._check("cudaMemcpyAsync", status)

    def new_stream(self) -> int:
        stream = ctypes.c_void_p()
        self._check("cudaStreamCreate", self.lib.cudaStreamCreate(ctypes.byref(stream)))
        return int(stream.value or 0)

    def synchronize(self, stream: int) -> None:
        self._check("cudaStreamSynchronize", self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)))


@functools.cache
def cuda_runtime() -> CudaRuntime:
    """The process's CudaRuntime; BackendUnavailable where libcudart cannot be loaded."""
    try:
        from polygraphy.cuda import wrapper
    except ImportError:
        raise BackendUnavailable(
            "trt: needs polygraphy to find the CUDA runtime (pip install 'gemma4-compile[trt]')"
        ) from None
    try:
        return CudaRuntime(wrapper().handle)
    except Exception as e:  # polygraphy's own exception, or OSError from ctypes
        raise BackendUnavailable(f"trt: cannot load the CUDA runtime library (libcudart): {e}") from None


class DeviceArray:
    """A typed device allocation that grows but never shrinks: a smaller or equal shape reuses the memory, a
    larger one reallocates (the old allocation is freed). Freed when the array is garbage-collected."""

    def __init__(self, cuda: CudaRuntime, shape: tuple[int, ...], dtype: Any):
        self.cuda = cuda
        self.dtype = np.dtype(dtype)
        self.shape: tuple[int, ...] = ()
        self.ptr = 0
        self.capacity = 0  # bytes allocated
        self.allocations = 0  # how many times this array allocated (tests check reuse with it)
        self._release: weakref.finalize | None = None
        self.staged: np.ndarray | None = None
        self.reshape(shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def reshape(self, shape: tuple[int, ...]) -> None:
        """Take `shape`; reallocate only if it needs more bytes than are allocated (contents are then lost)."""
        self.shape = tuple(int(d) for d in shape)
        if self.nbytes <= self.capacity:
            return
        self.free()
        self.ptr = self.cuda.malloc(self.nbytes)
        self.capacity = self.nbytes
        self.allocations += 1
        self._release = weakref.finalize(self, self.cuda.free, self.ptr)
        self._release.atexit = False  # the driver tears the context down at exit; a late cudaFree would fail

    def free(self) -> None:
        if self._release is not None:
            self._release()  # runs cuda.free once, even if called again later
        self.ptr, self.capacity, self._release = 0, 0, None

    def zero(self, stream: int) -> None:
        self.cuda.memset(self.ptr, self.nbytes, stream)

    def upload(self, host: np.ndarray, stream: int) -> None:
        """Take `host`'s shape (growing if needed) and copy it in; `host` must stay alive until a sync."""
        if host.dtype != self.dtype:
            raise RunnerError(f"trt: a {host.dtype} array cannot be copied into a {self.dtype} device buffer")
        self.reshape(host.shape)
        self.staged = np.ascontiguousarray(host)  # kept alive until the next upload: the copy is async
        if host.nbytes:
            self.cuda.to_device(self.ptr, self.staged, stream)

    def download(self, host: np.ndarray, stream: int) -> None:
        """Copy into `host` (contiguous, this shape and dtype); its contents are valid after a sync."""
        if host.shape != self.shape or host.dtype != self.dtype or not host.flags.c_contiguous:
            raise RunnerError(
                f"trt: cannot copy a {self.dtype}{list(self.shape)} device buffer into a "
                f"{host.dtype}{list(host.shape)} host array"
            )
        if host.nbytes:
            self.cuda.to_host(host, self.ptr, stream)
