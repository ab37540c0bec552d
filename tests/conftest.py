"""Shared fixtures (random tiny checkpoints and exports, made once per test session) and the one place where
the markers `rtx`, `trt` and `gpu` become skips with their reason on a machine that lacks what they name."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from pathlib import Path

# Triton kernels run on the CPU interpreter in tests (set before anything imports triton; a GPU machine
# can run them compiled with TRITON_INTERPRET=0).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from gemma4_compile.model.checkpoint import write_random_checkpoint
from gemma4_compile.model.presets import PRESETS, TINY_PRESETS
from gemma4_compile.targets import local_device_sm


@functools.cache
def _has_gpu() -> bool:
    return local_device_sm() is not None


@functools.cache
def _has_full_tensorrt() -> bool:
    try:
        importlib.import_module("tensorrt.plugin")  # only full TensorRT has it (docs/tensorrt.md)
    except ImportError:
        return False
    return True


# marker -> (is it available here?, the skip reason where it is not)
REQUIREMENTS = {
    "rtx": (
        lambda: importlib.util.find_spec("tensorrt_rtx") is not None,
        "needs tensorrt_rtx (pip install 'gemma4-compile[rtx]')",
    ),
    "trt": (
        lambda: _has_full_tensorrt() and _has_gpu(),
        "needs full TensorRT (tensorrt.plugin; not installable from PyPI) and a CUDA GPU",
    ),
    "gpu": (_has_gpu, "needs a CUDA GPU (torch.cuda)"),
}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, (available, reason) in REQUIREMENTS.items():
        if item.get_closest_marker(marker) is not None and not available():
            pytest.skip(reason)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(preset, dtype=torch.float32, seed=0) -> directory (cached per arguments)."""
    cache: dict[tuple, Path] = {}

    def make(preset: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
        key = (preset, dtype, seed)
        if key not in cache:
            path = tmp_path_factory.mktemp("ckpt") / f"{preset}-{str(dtype)[6:]}-{seed}"
            write_random_checkpoint(PRESETS[preset], path, seed=seed, dtype=dtype)
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def make_export(tmp_path_factory, make_checkpoint):
    """make_export(preset, dtype="fp32", debug=False, lowering=None) -> export directory (cached)."""
    from gemma4_compile.export import export_checkpoint

    cache: dict[tuple, Path] = {}

    def make(preset: str, dtype: str = "fp32", debug: bool = False, lowering: str | None = None) -> Path:
        key = (preset, dtype, debug, lowering)
        if key not in cache:
            out = tmp_path_factory.mktemp("export") / f"{preset}-{dtype}-{int(debug)}-{lowering}"
            export_checkpoint(
                make_checkpoint(preset), out, dtype=dtype, debug=debug, lowering=lowering, max_seq_len=256
            )
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(params=TINY_PRESETS)
def tiny_preset(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def reseal():
    """reseal(export_dir): record an export's current files in its export.json, as a buggy exporter would have
    written them, so the integrity check passes and a test must find the damage by numbers."""

    def seal(export: Path) -> None:
        import dataclasses

        from gemma4_compile.export.manifest import ExportManifest
        from gemma4_compile.fsutil import sha256_file

        m = ExportManifest.load(export)
        files = {name: sha256_file(export / name) for name in m.files}
        graphs = {r: dataclasses.replace(g, sha256=files[g.file]) for r, g in m.graphs.items()}
        dataclasses.replace(m, files=files, graphs=graphs).save(export)

    return seal


@pytest.fixture(scope="session")
def make_vision_export(tmp_path_factory):
    """make_vision_export(preset, dtype="fp32") -> (checkpoint with the preset's vision tower, its export in
    `dtype`) (cached; one checkpoint per preset). tiny-e2b's also holds the audio tower, merged by its embed
    graph: one export for the image and audio tests."""
    from gemma4_compile.export import export_checkpoint
    from gemma4_compile.model.presets import AUDIO_PRESETS, VISION_PRESETS

    roots: dict[str, Path] = {}
    cache: dict[tuple[str, str], tuple[Path, Path]] = {}

    def make(preset: str, dtype: str = "fp32") -> tuple[Path, Path]:
        if preset not in roots:
            root = tmp_path_factory.mktemp("vision-export") / preset
            spec, vision = PRESETS[preset], VISION_PRESETS[preset]
            audio = AUDIO_PRESETS[preset] if preset == "tiny-e2b" else None
            write_random_checkpoint(spec, root / "ckpt", dtype=torch.float32, vision=vision, audio=audio)
            roots[preset] = root
        if (preset, dtype) not in cache:
            root = roots[preset]
            out = root / ("out" if dtype == "fp32" else f"out-{dtype}")
            export_checkpoint(root / "ckpt", out, dtype=dtype, max_seq_len=256)
            cache[preset, dtype] = root / "ckpt", out
        return cache[preset, dtype]

    return make


@pytest.fixture(scope="session")
def make_quant_export(tmp_path_factory, make_checkpoint):
    """make_quant_export(preset, format, block_size=None, keep=(), dtype="fp32", method="rtn") -> export dir (cached);
    fp32 makes the onnxruntime form (MatMulNBits), fp16/bf16 the TensorRT one (DequantizeLinear)."""
    from gemma4_compile.export import export_checkpoint
    from gemma4_compile.quant.formats import QuantRequest

    cache: dict[tuple, Path] = {}

    def make(
        preset: str,
        fmt: str,
        block_size: int | None = None,
        keep: tuple[str, ...] = (),
        dtype: str = "fp32",
        method: str = "rtn",
    ) -> Path:
        key = (preset, fmt, block_size, keep, dtype, method)
        if key not in cache:
            out = (
                tmp_path_factory.mktemp("quant")
                / f"{preset}-{fmt}-b{block_size}-{'-'.join(keep)}-{dtype}-{method}"
            )
            request = QuantRequest(fmt, block_size, keep, method=method)
            export_checkpoint(make_checkpoint(preset), out, dtype=dtype, max_seq_len=128, quant=request)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def run_batched():
    """run_batched(runner, prompts, budgets, max_batch, max_len, timeout=120) -> (the tokens each prompt got
    from a BatchEngine (continuous batching) over `runner`, greedy, in prompt order; the stopped engine)."""
    import threading

    from gemma4_compile.runtime.batching import BatchEngine, Job
    from gemma4_compile.runtime.sampler import SamplingParams

    def run(runner, prompts, budgets, max_batch: int, max_len: int, timeout: float = 120):
        engine = BatchEngine(runner, max_batch=max_batch, max_len=max_len).start()
        done, out = threading.Semaphore(0), {i: [] for i in range(len(prompts))}

        def emitter(i):
            def emit(token, finish):
                if finish is None:
                    out[i].append(token)
                else:
                    done.release()

            return emit

        try:
            for i, (p, n) in enumerate(zip(prompts, budgets)):
                engine.submit(Job(p, n, SamplingParams(), frozenset(), emitter(i)))
            assert all(done.acquire(timeout=timeout) for _ in prompts)
        finally:
            engine.stop()
        return [out[i] for i in range(len(prompts))], engine

    return run
