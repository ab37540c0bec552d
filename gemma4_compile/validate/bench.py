"""Latency of a backend next to our torch eager model and transformers eager, measured in one run.

Prefill latency by prompt length (= time to first token), decode-step latency p50/p90/p99 by context length
(below, at and past the sliding window), tokens/s at batch 1 and 8, and memory. Timing goes through
`BaseRunner.start/step`, so every backend is timed on exactly the same calls. Benchmarks write rows; they
never assert (budgets belong in validation).

Exports with towers add media rows: each encoder on one image per soft-token budget and one clip per length
(the same preprocessed arrays for every side), and the time to first token of one image(+audio)+text prompt
from the decoded image and the waveform (preprocessing + encoders + embed + prefill). A backend times them
here; the references (our torch towers, transformers' Gemma4ForConditionalGeneration) are sides built from
bench_media.py, the only module of this pair that imports torch.
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
from ..export.manifest import ExportManifest, MultimodalSpec
from ..model.config import Gemma4Spec
from ..runners.base import BaseRunner
from ..runtime.errors import RuntimeInputError
from .cases import FIRST_ID
from .memory import ProbeRequest, own_process_memory
from .report import jsonable, write_reports

RunnerFactory = Callable[[], BaseRunner]
# a media side: encode_images(pixels, positions) / encode_audio(features, mask) -> (soft tokens, counts [N]),
# and optionally first_token(MediaPrompt) -> the prompt's first generated id (its TTFT row)
MediaFactory = Callable[[], Any]


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
    ttft_budget: int = 70  # the multimodal TTFT prompt: one image at this budget,
    ttft_audio_seconds: float = 1.0  # one clip this long (exports with audio),
    ttft_text_tokens: int = 32  # and this many text tokens after them

    def contexts(self, spec: Gemma4Spec, max_len: int) -> tuple[int, ...]:
        W = spec.sliding_window
        lengths = self.context_lengths or (max(1, W // 2), W, 2 * W, 4 * W)
        room = max_len - self.decode_steps - self.warmup - 1  # a decode row's cache must hold all its steps
        return tuple(sorted({min(c, room) for c in lengths if c >= 1}))


MEDIA_PHASES = ("vision", "audio", "ttft")


@dataclass(frozen=True)
class LatencyRow:
    backend: str
    # "prefill" (latency of the prompt = time to first token), "decode" (one token per row), an encoder:
    # "vision" (one image) / "audio" (one clip), or "ttft" (a media prompt from its image and waveform)
    phase: str
    batch: int
    # prompt length (prefill, ttft), tokens already cached (decode), soft tokens the side made (encoders)
    context: int
    samples: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    tokens_per_s: float  # prefill, ttft and encoders: batch * context / mean; decode: batch / mean
    vs_torch: float | None = None  # p50 / torch eager p50 on the same row (< 1: faster than torch)
    vs_hf: float | None = None  # p50 / transformers eager p50 on the same row
    budget: int | None = None  # vision, ttft: the image's soft-token budget
    audio_s: float | None = None  # audio, ttft: seconds of audio
    first_token: int | None = None  # ttft: the id generated (the sides should agree in fp32)

    @property
    def media(self) -> bool:
        return self.phase in MEDIA_PHASES

    @property
    def ms_per_audio_s(self) -> float | None:
        """audio rows: p50 per second of audio."""
        return self.p50_ms / self.audio_s if self.phase == "audio" and self.audio_s else None


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
    media_error: str | None = None  # why its media rows are missing (a reference side that could not load)
    kernels: str | None = (
        None  # the ort runner's own CPU kernels: which ran, or why none (runners/ort_kernels)
    )
    huge_pages: str | None = (
        None  # the ort runner's weights on transparent huge pages, or why not (huge_pages.py)
    )


@dataclass(frozen=True)
class LatencyReport:
    sliding_window: int
    precision: str
    config: BenchConfig
    rows: list[LatencyRow]
    backends: list[BackendSummary]
    environment: dict[str, Any] = field(default_factory=dict)
    export_dir: str | None = None
    media_note: str | None = None  # why an export with towers has no multimodal TTFT rows

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
            line = []
            if pre and dec:
                p, d = max(pre, key=lambda r: r.context), max(dec, key=lambda r: r.context)
                line.append(
                    f"TTFT {p.p50_ms:.2f} ms ({p.context} tokens), decode p50 {d.p50_ms:.2f} ms "
                    f"at context {d.context} ({d.tokens_per_s:.0f} tok/s)"
                )
            media = next((r for r in self.rows if r.backend == s.backend and r.phase == "ttft"), None)
            if media:
                line.append(f"media prompt TTFT {media.p50_ms:.2f} ms ({media.context} tokens)")
            if line:
                parts.append(f"{s.backend}: " + ", ".join(line))
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for row, r in zip(d["rows"], self.rows):
            row["ms_per_audio_s"] = r.ms_per_audio_s
        return jsonable(d)

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


def _timed(call: Callable[[], object], config: BenchConfig) -> tuple[list[float], object]:
    """Latencies of `call` after the warm-up, and its last result."""
    samples, out = [], None
    for rep in range(config.warmup + config.prefill_repeats):
        t0 = time.perf_counter()
        out = call()
        if rep >= config.warmup:
            samples.append(time.perf_counter() - t0)
    return samples, out


# ----- media: encoders and the multimodal time to first token -----------------------------------------


@dataclass(frozen=True)
class EncoderInput:
    """One item's preprocessed arrays, as every side's encoder takes them: (pixels, positions) of one image
    or (features, mask) of one clip."""

    arrays: tuple[np.ndarray, np.ndarray]
    budget: int | None = None  # images
    seconds: float | None = None  # clips


@dataclass(frozen=True)
class MediaPrompt:
    """The TTFT prompt: ids with one image run (and one audio run) made from our preprocessing's counts, and
    the decoded image and waveform each side preprocesses itself inside the timed call."""

    ids: np.ndarray  # [1, S]
    image: Any  # PIL image
    budget: int
    wave: np.ndarray | None  # 16 kHz float32; None: an export without audio
    mm: MultimodalSpec
    seconds: float | None = None


@dataclass(frozen=True)
class MediaInputs:
    images: list[EncoderInput]
    clips: list[EncoderInput]
    prompt: MediaPrompt | None
    note: str | None = None  # why there is no TTFT prompt


def _tone(seconds: float) -> np.ndarray:
    from ..model.audio_preprocess import SAMPLE_RATE

    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def media_inputs(manifest: ExportManifest, config: BenchConfig) -> MediaInputs | None:
    """The encoder inputs (one random 768x1024 image per budget, one tone per clip length) and the TTFT prompt
    of an export with towers; None without. Numpy and Pillow only."""
    mm = manifest.multimodal
    if mm is None:
        return None
    from PIL import Image

    from ..model.audio_preprocess import SAMPLE_RATE, audio_features, batch_features
    from ..model.vision_preprocess import batch_patches, image_patches

    rng = np.random.default_rng(config.seed)
    image = Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8))
    images = [
        EncoderInput(batch_patches([image_patches(image, mm.vision, b)]), budget=b)
        for b in config.image_budgets
    ]
    clips = []
    if "audio" in manifest.graphs:
        for seconds in config.audio_seconds:
            features = batch_features([audio_features(_tone(seconds), SAMPLE_RATE)])
            clips.append(EncoderInput(features, seconds=seconds))
    prompt, note = _media_prompt(manifest, image, config, rng)
    return MediaInputs(images, clips, prompt, note)


def _media_prompt(
    manifest: ExportManifest, image: Any, config: BenchConfig, rng: np.random.Generator
) -> tuple[MediaPrompt | None, str | None]:
    """bos, 5 text ids, the image run, 5 text ids, the audio run (with audio), `ttft_text_tokens` text ids."""
    from ..model.audio_preprocess import SAMPLE_RATE, audio_features
    from ..model.vision_preprocess import image_patches
    from ..runtime.audio import audio_run
    from ..runtime.images import image_run, image_support, join_runs

    spec = manifest.spec
    try:
        mm = image_support(manifest)
    except RuntimeInputError as e:
        return None, str(e)
    runs = [image_run(image_patches(image, mm.vision, config.ttft_budget).soft_tokens, mm)]
    wave = seconds = None
    if mm.audio is not None and "audio" in manifest.graphs:
        seconds = config.ttft_audio_seconds
        wave = _tone(seconds)
        runs.append(audio_run(audio_features(wave, SAMPLE_RATE).soft_tokens, mm.audio))
    lengths = [5] * len(runs) + [config.ttft_text_tokens]  # text before each run, and after the last
    text = [rng.integers(FIRST_ID, spec.vocab_size, n).tolist() for n in lengths]
    ids = [spec.bos_token_id, *join_runs(text, runs)]
    if len(ids) + 1 > manifest.max_seq_len:
        return None, f"the media prompt's {len(ids)} tokens + 1 exceed max_seq_len {manifest.max_seq_len}"
    return MediaPrompt(np.asarray([ids], np.int64), image, config.ttft_budget, wave, mm, seconds), None


class RunnerMedia:
    """A backend as a media side: its own encoders, and the runtime's prompt path (runtime/images.py,
    runtime/generate.py) for the TTFT, so the row times what `generate --image` runs."""

    def __init__(self, runner: BaseRunner):
        self.runner = runner
        self.encode_images = runner.encode_images  # type: ignore[attr-defined]
        self.encode_audio = runner.encode_audio  # type: ignore[attr-defined]

    def first_token(self, prompt: MediaPrompt) -> int:
        from ..model.audio_preprocess import SAMPLE_RATE, audio_features, batch_features
        from ..model.vision_preprocess import batch_patches
        from ..runtime.generate import generate
        from ..runtime.images import image_patches, soft_token_rows

        patches = image_patches([prompt.image], prompt.mm, prompt.budget)
        image_rows = soft_token_rows(*self.encode_images(*batch_patches(patches)))
        audio_rows = None
        if prompt.wave is not None:
            clip = audio_features(prompt.wave, SAMPLE_RATE)
            audio_rows = soft_token_rows(*self.encode_audio(*batch_features([clip])))
        ids = prompt.ids[0].tolist()
        return generate(self.runner, ids, 1, image_embeds=image_rows, audio_embeds=audio_rows).tokens[0]


def runner_media(runner: BaseRunner) -> RunnerMedia | None:
    """The runner as a media side, if it runs the export's encoders (the onnxruntime one)."""
    takes = getattr(runner, "manifest", None) is not None and hasattr(runner, "encode_images")
    return RunnerMedia(runner) if takes and runner.image_refusal is None else None


def time_media(side: Any, media: MediaInputs, config: BenchConfig) -> list[LatencyRow]:
    """Encoder rows (context: the soft tokens the side made) and the TTFT row of one media side."""
    rows = []
    for item in media.images:
        samples, (_, counts) = _timed(lambda a=item.arrays: side.encode_images(*a), config)
        rows.append(replace(_row("", "vision", 1, int(np.sum(counts)), samples), budget=item.budget))
    for item in media.clips:
        samples, (_, counts) = _timed(lambda a=item.arrays: side.encode_audio(*a), config)
        rows.append(replace(_row("", "audio", 1, int(np.sum(counts)), samples), audio_s=item.seconds))
    prompt = media.prompt
    if prompt is not None and hasattr(side, "first_token"):
        samples, token = _timed(lambda: side.first_token(prompt), config)
        row = _row("", "ttft", 1, prompt.ids.shape[1], samples)
        rows.append(replace(row, budget=prompt.budget, audio_s=prompt.seconds, first_token=int(token)))
    return rows


def _with_ratios(rows: list[LatencyRow]) -> list[LatencyRow]:
    """Each row's p50 over torch eager's and transformers eager's on the same (phase, batch, context)."""

    def base(name: str) -> dict[tuple, float]:
        return {(r.phase, r.batch, r.context): r.p50_ms for r in rows if r.backend == name}

    torch, hf = base("torch"), base("hf")

    def ratio(r: LatencyRow, ref: dict[tuple, float]) -> float | None:
        p50 = ref.get((r.phase, r.batch, r.context))
        return r.p50_ms / p50 if p50 else None

    return [replace(r, vs_torch=ratio(r, torch), vs_hf=ratio(r, hf)) for r in rows]


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
    media_sides: Mapping[str, MediaFactory] = {},
    media: MediaInputs | None = None,
) -> LatencyReport:
    """Time each runner in turn, built just before its turn (a factory) so memory is attributed to it.

    A factory that raises BackendUnavailable leaves a summary with the reason and no rows, except for a
    `required` runner, whose error is raised at once (before slower runners are timed). A runner that runs
    the export's encoders also gets media rows (inputs: `media`, else made from its export); `media_sides`
    (by backend name: torch, hf) are reference sides timed on the same inputs after that name's runner is
    gone, so the two models never share the process's memory.
    """
    config = config or BenchConfig()
    contexts = config.contexts(spec, max_len or spec.max_position_embeddings)
    rows: list[LatencyRow] = []
    summaries: dict[str, BackendSummary] = {}
    for name in dict.fromkeys([*runners, *media_sides]):
        if name in runners:
            turn = _runner_turn(name, runners[name], spec, config, contexts, media, name in required)
            timed, summaries[name], media = turn
            if timed is None:
                continue
            rows += timed
        if name in media_sides and media is not None:
            timed, error = _media_turn(name, media_sides[name], media, config)
            rows += timed
            if error:
                summary = summaries.get(name, BackendSummary(name, None, None))
                summaries[name] = replace(summary, media_error=error)
    report = LatencyReport(spec.sliding_window, precision, config, _with_ratios(rows), [], environment())
    return replace(report, backends=list(summaries.values()), media_note=media.note if media else None)


def _runner_turn(
    name: str,
    item: BaseRunner | RunnerFactory,
    spec: Gemma4Spec,
    config: BenchConfig,
    contexts: tuple[int, ...],
    media: MediaInputs | None,
    required: bool,
) -> tuple[list[LatencyRow] | None, BackendSummary, MediaInputs | None]:
    """One runner's rows (None: it could not be built, and is not `required`; the summary says why) and the
    media inputs, made from its export if none were given."""
    gc.collect()
    meter = _Meter()
    t0 = time.perf_counter()
    try:
        runner = item() if callable(item) and not isinstance(item, BaseRunner) else item
    except BackendUnavailable as e:
        if required:
            raise
        return None, BackendSummary(name, None, None, error=str(e)), media
    load_s = time.perf_counter() - t0 if runner is not item else None
    meter.sample()
    timed = time_runner(runner, spec, config, contexts, meter)
    side = runner_media(runner)
    if side is not None:
        media = media or media_inputs(runner.manifest, config)  # type: ignore[attr-defined]
        timed += time_media(side, media, config) if media else []
    own = getattr(runner, "peak_memory_bytes", None)  # a runner that knows its own device memory wins
    device_mb = own() / 2**20 if callable(own) else meter.device_peak
    summary = BackendSummary(
        name,
        load_s,
        device_mb,
        memory_note="not measured",
        engine_target=runner.engine_target,
        kernels=getattr(runner, "kernels", None),
        huge_pages=getattr(runner, "huge_pages", None),
    )
    return [replace(r, backend=name) for r in timed], summary, media


def _media_turn(
    name: str, factory: MediaFactory, media: MediaInputs, config: BenchConfig
) -> tuple[list[LatencyRow], str | None]:
    """A reference side's media rows, or none and why it could not be built."""
    gc.collect()
    try:
        side = factory()
    except BackendUnavailable as e:
        return [], str(e)
    rows = [replace(r, backend=name) for r in time_media(side, media, config)]
    del side
    return rows, None


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
    # the media inputs come from the export itself, so the references get rows even beside a backend without
    # the export's encoders
    config = config or BenchConfig()
    media = media_inputs(manifest, config)
    sides = {n: _media_factory(n, ckpt, manifest, precision) for n in compare} if media else {}
    report = bench_runners(factories, spec, config, precision, manifest.max_seq_len, backends, sides, media)
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
    rows = [r for r in report.rows if r.backend == summary.backend and not r.media]
    if not rows:
        return summary
    batch, context = max(r.batch for r in rows), max(r.context for r in rows)
    steps = report.config.decode_steps
    got = own_process_memory(
        replace(probe, backend=summary.backend, batch=batch, context=context, steps=steps)
    )
    if isinstance(got, str):
        return replace(summary, memory_note=got)
    note = f"own process, batch {batch}, {context}-token prompt + {steps} decode steps"
    return replace(summary, base_rss_mb=got.base_mb, peak_rss_mb=got.peak_mb, memory_note=note)


def _media_factory(name: str, ckpt: Path | None, manifest: ExportManifest, precision: str) -> MediaFactory:
    """A reference media side by name, loaded when its turn comes; errors become BackendUnavailable."""

    def make() -> Any:
        if ckpt is None:
            raise BackendUnavailable(f"{name}: its media rows need the source checkpoint (--checkpoint)")
        try:
            from .bench_media import media_side

            return media_side(name, ckpt, manifest, precision)
        except ImportError as e:
            raise BackendUnavailable(f"{name}: media side not available ({e})") from None
        except Gemma4CompileError as e:
            raise BackendUnavailable(f"{name}: {e}") from None

    return make


def _optional(make: Callable[..., BaseRunner], name: str, *args: Any) -> BaseRunner:
    """Comparison runners are optional: any user error building one becomes BackendUnavailable."""
    try:
        return make(name, *args)
    except Gemma4CompileError as e:
        raise BackendUnavailable(f"{name}: {e}") from None
