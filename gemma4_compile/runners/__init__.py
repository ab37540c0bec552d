"""Runners of an export (onnxruntime, TensorRT) behind one interface; torch-free.

    runner = OrtRunner(OUT)                         # or TrtRunner(OUT, "sm89")
    tokens = runner.generate(ids, steps=16)

The PyTorch references (our model, transformers) live in gemma4_compile.validate.reference.
Backends import on first use, so this package imports without onnxruntime or TensorRT.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .base import BaseRunner, DecodeState, lengths_of

__all__ = ["BaseRunner", "DecodeState", "OrtRunner", "TrtRunner", "lengths_of"]
_LAZY = {"OrtRunner": ".ort", "TrtRunner": ".trt"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
