"""Launch arithmetic shared by the kernels' torch wrappers and the AOT launch specs (a leaf: imports nothing)."""

from __future__ import annotations

from typing import Any


def cdiv(a: Any, b: Any) -> Any:
    """Ceiling division using only + and //, so it also works on TensorRT symbolic shape expressions."""
    return (a + b - 1) // b
