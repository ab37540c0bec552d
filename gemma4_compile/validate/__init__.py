"""Validate stage: does a backend compute what PyTorch computes, and how fast.

    report = validate(OUT, backend="ort")          # AccuracyReport; writes OUT/reports/accuracy.*
    report.raise_if_failed()                       # ValidationFailed (exit code 2) with the first failing case
    latency = bench(OUT, backends=["ort"])         # LatencyReport next to torch and transformers eager

The runners are imported on first use: this package imports without torch, transformers, onnxruntime or
TensorRT, so `validate --backend ort` and bench's own-process memory probes carry only what their backend needs.
"""

from __future__ import annotations

from typing import Any

from ..runners.base import BaseRunner
from .bench import BenchConfig, LatencyReport, bench, bench_runners
from .cases import Case, default_cases, load_prompts
from .report import write_reports
from .validate import TOLERANCES, AccuracyReport, Tolerance, compare_runners, validate

__all__ = [
    "TOLERANCES",
    "AccuracyReport",
    "BaseRunner",
    "BenchConfig",
    "Case",
    "HFRunner",
    "LatencyReport",
    "OrtRunner",
    "Tolerance",
    "TorchRunner",
    "TrtRunner",
    "bench",
    "bench_runners",
    "compare_runners",
    "default_cases",
    "load_prompts",
    "validate",
    "write_reports",
]

_LAZY = {
    "OrtRunner": "..runners.ort",
    "TrtRunner": "..runners.trt",
    "HFRunner": ".reference",
    "TorchRunner": ".reference",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
