"""The one place the runtime imports a runner, so the runner's home can change in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable

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


def open_runner(
    export_dir: str | Path, backend: str = "ort", provider: str = "cpu", threads: int | None = None
) -> Any:
    """A runner (`start(batch, max_len)`, `step(state, ids, seq_len)`) over the export in `export_dir`."""
    if backend == "ort":
        from ..runners.ort import OrtRunner

        return OrtRunner(export_dir, threads=threads, providers=ort_providers(provider))
    if backend == "trt":
        from ..runners.trt import TrtRunner

        return TrtRunner(export_dir)
    raise BackendUnavailable(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
