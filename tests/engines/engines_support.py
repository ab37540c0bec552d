"""Skip conditions shared by the engine tests (a module, not conftest, so tests can import it by a unique name).
The `rtx` / `trt` / `gpu` markers are turned into skips in tests/conftest.py."""

from __future__ import annotations

import importlib.util

import pytest

from gemma4_compile.targets import local_device_sm

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
HAS_FULL_TRT = importlib.util.find_spec("tensorrt") is not None
DEVICE_SM = local_device_sm()

needs_gpu_trt = pytest.mark.skipif(
    DEVICE_SM is None or not (HAS_RTX or HAS_FULL_TRT),
    reason="needs a CUDA GPU and a TensorRT runtime; engines cannot run on this machine",
)


def has_exporter() -> bool:
    try:
        from gemma4_compile.export import export_checkpoint  # noqa: F401
    except ImportError:
        return False
    return True
