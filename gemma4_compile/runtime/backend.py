"""The one place the runtime imports a runner, so the runner's home can change in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable
from ..memory import map_large_allocations

BACKENDS = ("ort", "trt")
PROVIDERS = ("cpu", "cuda")


def ort_providers(provider: str) -> list[str]:
    """onnxruntime execution providers for `provider`; CUDA needs onnxruntime-gpu."""
    if provider not in PROVIDERS:
        raise BackendUnavailable(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendUnavailable(
            "ort: the CUDA provider is not available (pip install 'gemma4-compile[gpu]' for onnxruntime-gpu)"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


LOW_MEMORY_PREFILL = 8  # prompt tokens per call with low_memory: the [8, 262144] fp32 logits of E2B are 8 MiB


def return_freed_memory() -> None:
    """Freed activation buffers above 64 KiB go back to the system instead of staying in glibc's heap."""
    map_large_allocations(64 << 10)


def _ort_options(low_memory: bool) -> Any:
    """onnxruntime session options: without its CPU arena, which keeps every call's peak (low_memory)."""
    if not low_memory:
        return None
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False
    return_freed_memory()
    return options


def open_runner(
    export_dir: str | Path,
    backend: str = "ort",
    provider: str = "cpu",
    threads: int | None = None,
    low_memory: bool = False,
) -> Any:
    """A runner (`start(batch, max_len)`, `step(state, ids, seq_len)`) over the export in `export_dir`.
    `low_memory`: onnxruntime without its memory arena and freed buffers returned to the system (the edge
    recipe, README; prefill in chunks of LOW_MEMORY_PREFILL with it)."""
    if backend == "ort":
        from ..runners.ort import OrtRunner

        options = _ort_options(low_memory)
        return OrtRunner(export_dir, threads=threads, providers=ort_providers(provider), options=options)
    if backend == "trt":
        from ..runners.trt import TrtRunner

        return TrtRunner(export_dir)
    raise BackendUnavailable(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
