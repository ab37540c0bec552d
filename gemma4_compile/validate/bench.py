"""Latency of a backend next to our torch eager model and transformers eager, measured in one run.

Prefill latency by prompt length (= time to first token), decode-step latency p50/p90/p99 by context length
(below, at and past the sliding window), tokens/s at batch 1 and 8, and memory. Timing goes through
`BaseRunner.start/step`, so every backend is timed on exactly the same calls. Benchmarks write rows; they
never assert (budgets belong in validation).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailable, Gemma4CompileError
from ..model.config import Gemma4Spec
from ..runners.base import BaseRunner
from .cases import FIRST_ID
from .memory import ProbeRequest, own_process_memory
from .report import jsonable, write_reports

RunnerFactory = Callable[[], BaseRunner]


@dataclass(frozen=True)
class BenchConfig:
    """What to time. Context lengths default to (W/2, W, 2W, 4W): decode past W exercises the sliding ring."""

    context_lengths: tuple[int, ...] | None = None
    batch_sizes: tuple[int, ...] = (1, 8)
    decode_steps: int = 8  # timed decode steps per (batch, context)
    prefill_repeats: int = 3  # timed prefills per (batch, context)
    warmup: int = 1
    seed: int = 0
    image_budgets: tuple[int, ...] = (70, 280)  # vision.onnx: one image per soft-token budget
    audio_seconds: tuple[float, ...] = (1.0, 10.0)  # audio.onnx: one clip per length

    def contexts(self, spec: Gemma4Spec, max_len: int) -> tuple[int, ...]:
        W = spec.sliding_window
        lengths = self.context_lengths or (max(1, W // 2), W, 2 * W, 4 * W)
        room = max_len - self.decode_steps - self.warmup - 1  # a decode row's cache must hold all its steps
        return tuple(sorted({min(c, room) for c in lengths if c >= 1}))


@dataclass(frozen=True)
class LatencyRow:
    backend: str
    # "prefill" (latency of the prompt = time to first token), "decode" (one token per row), or an encoder:
    # "vision" (one image) / "audio" (one clip)
    phase: str
    batch: int
    context: int  # prompt length (prefill), tokens already cached (decode), soft tokens made (encoders)
    samples: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    tokens_per_s: float  # prefill and encoders: batch * context / mean; decode: batch / mean
    vs_torch: float | None = None  # p50 / torch eager p50 on the same row (< 1: faster than torch)


@dataclass(frozen=True)
class BackendSummary:
    backend: str
    load_s: float | None
    device_peak_mb: float | None  # runner's `peak_memory_bytes()`, else CUDA memory in use (whole device)
    error: str | None = None  # why it did not run (unavailable backend); then it has no rows
    # measured in a process of its own (validate/memory.py); None with `memory_note` saying why not
    base_rss_mb: float | None = None  # that process before the backend was built
    peak_rss_mb: float | None = None  # its lifetime peak, running the largest (batch, context) timed here
    memory_note: str | None = None
    engine_target: str | None = None  # the engine a trt backend executed


@dataclass(frozen=True)
class LatencyReport:
    sliding_window: int
    precision: str
    config: BenchConfig
    rows: list[LatencyRow]
    backends: list[BackendSummary]
    environment: dict[str, Any] = field(default_factory=dict)
    export_dir: str | None = None

    def row(self, backend: str, phase: str, batch: int, context: int) -> LatencyRow | None:
        return next(
            (
                r
                for r in self.rows
                if (r.backend, r.phase, r.batch, r.context) == (backend, phase, batch, context)
            ),
            None,
        )

    def ttft_ms(self, backend: str) -> dict[int, float]:
        """Time to first token at batch 1 by prompt length (the prefill's p50)."""
        return {
            r.context: r.p50_ms
            for r in self.rows
            if r.backend == backend and r.phase == "prefill" and r.batch == 1
        }

    def summary(self) -> str:
        """One line per backend: TTFT at the longest prompt and decode p50 / tokens/s at batch 1."""
        parts = []
        for s in self.backends:
            if s.error:
                parts.append(f"{s.backend}: not run ({s.error})")
                continue
            pre = [r for r in self.rows if r.backend == s.backend and r.phase == "prefill" and r.batch == 1]
            dec = [r for r in self.rows if r.backend == s.backend and r.phase == "decode" and r.batch == 1]
            if pre and dec:
                p, d = max(pre, key=lambda r: r.context), max(dec, key=lambda r: r.context)
                parts.append(
                    f"{s.backend}: TTFT {p.p50_ms:.2f} ms ({p.context} tokens), decode p50 {d.p50_ms:.2f} ms "
                    f"at context {d.context} ({d.tokens_per_s:.0f} tok/s)"
                )
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")


# ----- measurement ------------------------------------------------------------------------------


def quantiles_ms(samples_s: list[float]) -> tuple[float, float, float, float]:
    """p50, p90, p99 and mean of latencies given in seconds, in milliseconds."""
    a = np.asarray(samples_s, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return float(p50), float(p90), float(p99), float(a.mean())


def _row(backend: str, phase: str, batch: int, context: int, samples: list[float]) -> LatencyRow:
    p50, p90, p99, mean = quantiles_ms(samples)
    tokens = batch * (1 if phase == "decode" else context)  # encoders: soft tokens made per second
    return LatencyRow(
        backend, phase, batch, context, len(samples), p50, p90, p99, mean, tokens / (mean / 1e3)
    )


def _device_used_mb() -> float | None:
    """Memory in use on the current CUDA device (all processes), or None without CUDA or without torch loaded
    (importing it here would put torch into every ORT benchmark)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    try:
        free, total = torch.cuda.mem_get_info()
    except RuntimeError:
        return None
    return (total - free) / 2**20


class _Meter:
    """Times steps; samples device memory after each one (outside the timed region). Host memory is measured
    per backend in a process of its own (memory.py), not here, where all backends share one process."""

    def __init__(self) -> None:
        self.device_peak = _device_used_mb()

    def sample(self) -> None:
        device = _device_used_mb()
        if device is not None:
            self.device_peak = max(self.device_peak or 0.0, device)

    def step(
        self, runner: BaseRunner, state: Any, ids: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        logits = runner.step(state, ids, lengths)  # returns host logits, so the device work is done
        dt = time.perf_counter() - t0
        self.sample()
        return logits, dt


def time_runner(
    runner: BaseRunner, spec: Gemma4Spec, config: BenchConfig, contexts: tuple[int, ...], meter: _Meter
) -> list[LatencyRow]:
    """Prefill and decode-step latencies of one runner at every (batch, context)."""
    rng = np.random.default_rng(config.seed)
    rows = []
    for batch in config.batch_sizes:
        for ctx in contexts:
            ids = rng.integers(FIRST_ID, spec.vocab_size, (batch, ctx), dtype=np.int64)
            full = np.full(batch, ctx, dtype=np.int64)
            ones = np.ones(batch, dtype=np.int64)
            prefill: list[float] = []
            for rep in range(config.warmup + config.prefill_repeats):
                state = runner.start(batch, ctx + config.decode_steps + config.warmup + 1)
                logits, dt = meter.step(runner, state, ids, full)
                if rep >= config.warmup:
                    prefill.append(dt)
            decode: list[float] = []
            token = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
            for i in range(config.warmup + config.decode_steps):  # continues the last prefill's state
                logits, dt = meter.step(runner, state, token, ones)
                token = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
                if i >= config.warmup:
                    decode.append(dt)
            rows.append(_row(runner.name, "prefill", batch, ctx, prefill))
            # decode steps run at contexts ctx + warmup .. ctx + warmup + steps - 1; labelled by where they start
            rows.append(_row(runner.name, "decode", batch, ctx, decode))
    return rows


def _timed(call: Callable[[], object], config: BenchConfig) -> list[float]:
    samples = []
    for rep in range(config.warmup + config.prefill_repeats):
        t0 = time.perf_counter()
        call()
        if rep >= config.warmup:
            samples.append(time.perf_counter() - t0)
    return samples


def time_encoders(runner: BaseRunner, config: BenchConfig) -> list[LatencyRow]:
    """vision.onnx / audio.onnx latency of a runner that runs them (the onnxruntime one): one random image per
    budget, one tone per clip length, preprocessing outside the timed call; context = the soft tokens made."""
    manifest = getattr(runner, "manifest", None)
    mm = getattr(manifest, "multimodal", None)
    if mm is None or not hasattr(runner, "encode_images"):
        return []
    from ..model.vision_preprocess import batch_patches, image_patches

    rows = []
    rng = np.random.default_rng(config.seed)
    if "vision" in manifest.graphs:
        from PIL import Image

        image = Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8))
        for budget in config.image_budgets:
            patches = image_patches(image, mm.vision, budget)
            feeds = batch_patches([patches])
            samples = _timed(lambda feeds=feeds: runner.encode_images(*feeds), config)
            rows.append(_row(runner.name, "vision", 1, patches.soft_tokens, samples))
    if "audio" in manifest.graphs:
        from ..model.audio_preprocess import SAMPLE_RATE, audio_features, batch_features

        for seconds in config.audio_seconds:
            t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
            clip = audio_features((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), SAMPLE_RATE)
            feeds = batch_features([clip])
            samples = _timed(lambda feeds=feeds: runner.encode_audio(*feeds), config)
            rows.append(_row(runner.name, "audio", 1, clip.soft_tokens, samples))
    return rows


def _with_ratios(rows: list[LatencyRow]) -> list[LatencyRow]:
    base = {(r.phase, r.batch, r.context): r.p50_ms for r in rows if r.backend == "torch"}
    out = []
    for r in rows:
        ref = base.get((r.phase, r.batch, r.context))
        out.append(LatencyRow(**{**asdict(r), "vs_torch": r.p50_ms / ref if ref else None}))
    return out


def environment() -> dict[str, Any]:
    """Versions of what was timed; torch's thread count only where a torch runner loaded it."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    for module in ("onnxruntime", "torch", "transformers", "tensorrt", "tensorrt_rtx"):
        if module in sys.modules:
            env[module] = getattr(sys.modules[module], "__version__", "?")
    if "torch" in sys.modules:
        env["torch_threads"] = sys.modules["torch"].get_num_threads()
    return env


def bench_runners(
    runners: Mapping[str, BaseRunner | RunnerFactory],
    spec: Gemma4Spec,
    config: BenchConfig | None = None,
    precision: str = "fp32",
    max_len: int | None = None,
    required: Collection[str] = (),
) -> LatencyReport:
    """Time each runner in turn, built just before its turn (a factory) so memory is attributed to it.

    A factory that raises BackendUnavailable leaves a summary with the reason and no rows, except for a
    `required` runner, whose error is raised at once (before slower runners are timed).
    """
    config = config or BenchConfig()
    contexts = config.contexts(spec, max_len or spec.max_position_embeddings)
    rows: list[LatencyRow] = []
    summaries: list[BackendSummary] = []
    for name, item in runners.items():
        gc.collect()
        meter = _Meter()
        t0 = time.perf_counter()
        try:
            runner = item() if callable(item) and not isinstance(item, BaseRunner) else item
        except BackendUnavailable as e:
            if name in required:
                raise
            summaries.append(BackendSummary(name, None, None, error=str(e)))
            continue
        load_s = time.perf_counter() - t0 if runner is not item else None
        meter.sample()
        timed = time_runner(runner, spec, config, contexts, meter) + time_encoders(runner, config)
        rows += [LatencyRow(**{**asdict(r), "backend": name}) for r in timed]
        own = getattr(runner, "peak_memory_bytes", None)  # a runner that knows its own device memory wins
        device_mb = own() / 2**20 if callable(own) else meter.device_peak
        summaries.append(
            BackendSummary(
                name, load_s, device_mb, memory_note="not measured", engine_target=runner.engine_target
            )
        )
        del runner
    return LatencyReport(spec.sliding_window, precision, config, _with_ratios(rows), summaries, environment())


def bench(
    export_dir: str | Path,
    backends: tuple[str, ...] | list[str] = ("ort",),
    compare: tuple[str, ...] | list[str] = ("torch", "hf"),
    checkpoint: str | Path | None = None,
    config: BenchConfig | None = None,
    out_dir: str | Path | None = None,
    target: str | None = None,
    write: bool = True,
    memory: bool = True,
) -> LatencyReport:
    """Benchmark an export's backends next to torch eager and transformers eager; reports to out_dir/reports.

    `compare` runners need the source checkpoint (`checkpoint`, or export.json's "checkpoint"); one that cannot
    be built is listed with its reason instead of failing the run. Requested `backends` must be available.
    `memory`: measure each backend's peak RSS in a process of its own (validate/memory.py).
    """
    from ..export.manifest import ExportManifest
    from .validate import make_runner, source_checkpoint

    export_dir = Path(export_dir)
    manifest = ExportManifest.load(export_dir)
    manifest.verify()  # graphs and weights match export.json before anything runs
    precision, spec = manifest.dtype, manifest.spec
    ckpt = source_checkpoint(manifest, checkpoint)
    factories: dict[str, RunnerFactory] = {}
    # requested backends first, and their errors raised at once: a missing GPU fails before minutes of CPU baselines
    for name in backends:
        factories[name] = lambda name=name: make_runner(name, export_dir, ckpt, precision, target)
    for name in compare:
        if name not in factories:
            factories[name] = lambda name=name: _optional(make_runner, name, export_dir, ckpt, precision)
    report = bench_runners(factories, spec, config, precision, manifest.max_seq_len, required=backends)
    summaries = report.backends
    if memory:
        probe = ProbeRequest("", str(export_dir), str(ckpt) if ckpt else None, precision, target, 1, 1, 0)
        summaries = [_with_memory(s, report, probe) for s in summaries]
    report = replace(report, backends=summaries, export_dir=str(export_dir))
    if write:
        write_reports(Path(out_dir) if out_dir else export_dir, latency=report)
    return report


def _with_memory(summary: BackendSummary, report: LatencyReport, probe: ProbeRequest) -> BackendSummary:
    """The backend's own-process memory at the largest batch and context it was timed at."""
    if summary.error:
        return summary
    rows = [r for r in report.rows if r.backend == summary.backend]
    batch, context = max(r.batch for r in rows), max(r.context for r in rows)
    steps = report.config.decode_steps
    got = own_process_memory(
        replace(probe, backend=summary.backend, batch=batch, context=context, steps=steps)
    )
    if isinstance(got, str):
        return replace(summary, memory_note=got)
    note = f"own process, batch {batch}, {context}-token prompt + {steps} decode steps"
    return replace(summary, base_rss_mb=got.base_mb, peak_rss_mb=got.peak_mb, memory_note=note)


def _optional(make: Callable[..., BaseRunner], name: str, *args: Any) -> BaseRunner:
    """Comparison runners are optional: any user error building one becomes BackendUnavailable."""
    try:
        return make(name, *args)
    except Gemma4CompileError as e:
        raise BackendUnavailable(f"{name}: {e}") from None
