"""TensorRT engine runner: the embed graph on the CPU (a gather), the decoder and tower engines on the GPU.

    runner = TrtRunner("OUT", "sm89")       # OUT/engines/sm89, checked against this GPU and TensorRT
    runner.generate(ids, steps=8)
    soft, soft_len = runner.encode_images(pixels, positions)   # vision.engine (audio.engine: encode_audio)

No torch: device memory goes through runners/cuda.py (libcudart via ctypes), host tensors are numpy (bf16 as
ml_dtypes.bfloat16). Caches are device buffers shaped as export.json says (sliding caches W slots, global caches
`max_len` slots), allocated and zeroed once per `start()` together with a second set the presents are written to;
the two sets swap after each step (TensorRT inputs and outputs must not alias), so a step copies no cache. The
step's other inputs (embeds, past_len, seq_len, mm_block_ids) are copied into device buffers reused across
steps, and the logits back into a reused host buffer; everything runs on one stream. Soft tokens of images
and audio come from the tower engines to the host and are merged by the CPU embed graph, as onnxruntime merges
them. Nothing here touches a TensorRT runtime unless a CUDA GPU is present: a runtime created without one can
segfault (docs/tensorrt.md, runtimes without a GPU).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import DType
from ..engines.load import EngineFile, deserialize, engine_dir, open_engine
from ..engines.manifest import read_manifest
from ..engines.profiles import ShapeProfile, profile_index
from ..engines.seam import load_trt, make_logger
from ..errors import BackendUnavailable, Gemma4CompileError, RunnerError
from ..export.manifest import (
    AUDIO,
    AUDIO_EMBEDS,
    DECODER,
    EMBED,
    IMAGE_EMBEDS,
    MM_BLOCK_IDS,
    VISION,
    ExportManifest,
    GraphSpec,
)
from ..targets import local_device_sm
from .base import BaseRunner, DecodeState, empty_rows
from .cuda import CudaRuntime, DeviceArray, cuda_runtime


class EmbedGraph:
    """embed.onnx on the CPU: onnxruntime, or onnx's reference evaluator where onnxruntime has no kernel
    (its CPU provider has no bf16 Mul). Outputs are numpy arrays of the graph's dtypes, bf16 as ml_dtypes'."""

    def __init__(self, path: Path, soft_inputs: Any = ()):
        """`soft_inputs`: the graph's soft-token inputs (TensorSpecs) when it merges images / audio; fed zero
        rows."""
        import onnxruntime as ort

        self.no_rows = {t.name: empty_rows(t) for t in soft_inputs}
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self.reference = None
        except (
            Exception
        ):  # onnxruntime raises NotImplemented/Fail subclasses of RuntimeError for missing kernels
            from onnx.reference import ReferenceEvaluator

            self.session, self.reference = None, ReferenceEvaluator(str(path))
        self.backend = "onnxruntime" if self.session is not None else "onnx.reference"

    def run(self, input_ids: np.ndarray, rows: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """`rows`: soft tokens by input name (image_embeds, audio_embeds) for this call's placeholders; the
        inputs left out get zero rows."""
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64), **self.no_rows}
        for name, soft in (rows or {}).items():
            feeds[name] = np.ascontiguousarray(soft, dtype=self.no_rows[name].dtype)
        if self.reference is not None:
            names = self.reference.output_names
            return {n: np.ascontiguousarray(a) for n, a in zip(names, self.reference.run(None, feeds))}
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        names = [o.name for o in self.session.get_outputs()]
        for name in names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return {name: _ortvalue_to_numpy(value) for name, value in zip(names, binding.get_outputs())}


def _ortvalue_to_numpy(value: Any) -> np.ndarray:
    """Copy a CPU OrtValue of any dtype into a numpy array (OrtValue.numpy() cannot return bf16)."""
    array = np.empty(value.shape(), DType.parse(value.element_type()).numpy)
    if array.nbytes:  # a copy: ORT owns its buffer
        ctypes.memmove(array.ctypes.data, value.data_ptr(), array.nbytes)
    return array


class CacheBuffers:
    """A state's caches on the device: `past` (name -> buffer, zeroed) feeds a step, whose presents are written
    to `present`; `swap()` then makes the presents the next past and the old pasts the next present buffers.
    `take` / `concat` make new caches from rows of these (continuous batching: rows join and leave)."""

    def __init__(
        self,
        cuda: CudaRuntime,
        shapes: dict[str, tuple[int, ...]],
        pairs: dict[str, str],
        dtype: Any,
        stream: int,
    ):
        """`shapes`: past name -> shape [B, ...]; `pairs`: past name -> its present name; `stream`: the runner's."""
        self.cuda, self.pairs, self.dtype, self.stream = cuda, pairs, np.dtype(dtype), stream
        self.past = {name: DeviceArray(cuda, shape, dtype) for name, shape in shapes.items()}
        self.present = {pairs[name]: DeviceArray(cuda, shape, dtype) for name, shape in shapes.items()}

    @property
    def batch(self) -> int:
        return next(iter(self.past.values())).shape[0]

    def zero(self) -> None:
        for buffer in self.past.values():
            buffer.zero(self.stream)

    def swap(self) -> None:
        for past, present in self.pairs.items():
            self.past[past], self.present[present] = self.present[present], self.past[past]

    def take(self, rows: np.ndarray) -> CacheBuffers:
        """New caches holding rows `rows` (batch indices) of these."""
        return self._gathered([(self, np.asarray(rows))])

    def concat(self, *others: CacheBuffers) -> CacheBuffers:
        """New caches holding these rows, then each of `others`' (same cache shapes but for the batch)."""
        return self._gathered([(c, np.arange(c.batch)) for c in (self, *others)])

    def _gathered(self, parts: list[tuple[CacheBuffers, np.ndarray]]) -> CacheBuffers:
        batch = sum(len(rows) for _, rows in parts)
        shapes = {name: (batch, *b.shape[1:]) for name, b in self.past.items()}
        for source, _ in parts:
            if {n: b.shape[1:] for n, b in source.past.items()} != {n: s[1:] for n, s in shapes.items()}:
                raise RunnerError(
                    "trt: cannot join caches of different shapes (started with another max_len)"
                )
        out = CacheBuffers(self.cuda, shapes, self.pairs, self.dtype, self.stream)
        for name, buffer in out.past.items():
            row = buffer.nbytes // batch  # [B, ...] row-major: a row is one contiguous block
            dst = buffer.ptr
            for source, rows in parts:
                for r in rows:
                    self.cuda.copy(dst, source.past[name].ptr + int(r) * row, row, self.stream)
                    dst += row
        self.cuda.synchronize(self.stream)  # the sources may be freed once this returns
        return out


class StepBuffers:
    """A runner's per-step device buffers (inputs that are not caches, outputs that are not presents) and the host
    buffer the logits come back to; reused across steps and states, grown when a shape grows."""

    def __init__(self, cuda: CudaRuntime, dtypes: dict[str, Any]):
        """`dtypes`: tensor name -> numpy dtype, as the engine declares it."""
        self.cuda, self.dtypes = cuda, dtypes
        self.device: dict[str, DeviceArray] = {}
        self.host: dict[str, np.ndarray] = {}

    def buffer(self, name: str, shape: tuple[int, ...]) -> DeviceArray:
        buffer = self.device.get(name)
        if buffer is None:
            buffer = self.device[name] = DeviceArray(self.cuda, shape, self.dtypes[name])
        buffer.reshape(shape)
        return buffer

    def upload(self, name: str, array: np.ndarray, stream: int) -> DeviceArray:
        if array.dtype != self.dtypes[name]:
            raise RunnerError(f"trt: input {name!r} is {array.dtype}, the engine takes {self.dtypes[name]}")
        buffer = self.buffer(name, array.shape)
        buffer.upload(array, stream)
        return buffer

    def download(self, name: str, stream: int) -> np.ndarray:
        """Queue the copy of output `name` into its host buffer (read it after a sync)."""
        device = self.device[name]
        size = int(np.prod(device.shape))
        host = self.host.get(name)
        if host is None or host.size < size:
            host = self.host[name] = np.empty(size, device.dtype)
        view = host[:size].reshape(device.shape)
        device.download(view, stream)
        return view


# what each dim of a tower engine's profile counts, and the build option that sets its largest value
_TOWER_DIMS = {
    "images": ("images", "--max-images"),
    "patches": ("patches per image", "--max-image-tokens (soft tokens per image)"),
    "clips": ("audio clips", "--max-clips"),
    "frames": ("log-mel frames per clip", "BuildOptions.max_frames"),
}


def _outside_profile(role: str, dim: str, value: int, lo: int, hi: int) -> str:
    noun, option = _TOWER_DIMS.get(dim, (dim, None))
    if value > hi:
        build = f"; build with a larger {option}" if option else ""
        return f"trt: {value} {noun} exceed the {role} engine's profile (at most {hi}{build})"
    return f"trt: {value} {noun} are below the {role} engine's profile (at least {lo})"


def _set_input(context: Any, name: str, buffer: DeviceArray, profile: ShapeProfile, what: str) -> None:
    """Give the context an input's shape and address; a shape outside the profile is one line."""
    if not context.set_input_shape(name, buffer.shape):
        s = profile.shape(name)
        raise RunnerError(
            f"trt: {what} input {name!r} shape {buffer.shape} is outside the engine's profile {s.min}..{s.max}"
        )
    context.set_tensor_address(name, buffer.ptr)


def _execute(context: Any, stream: int, logger: Any, what: str) -> None:
    if not context.execute_async_v3(stream):
        raise RunnerError(f"trt: {what}: TensorRT execution failed: {'; '.join(logger.errors())}")


def _dtypes(engine: Any, names: list[str]) -> dict[str, Any]:
    """Tensor name -> numpy dtype, as the engine declares it."""
    return {n: DType.parse(engine.get_tensor_dtype(n).name).numpy for n in names}


class TowerEngine:
    """A vision or audio engine: one profile ("images" / "clips"), one execution context; host arrays in, host
    copies of the outputs back, one synchronize per call. Device buffers are reused across calls."""

    def __init__(
        self,
        graph: GraphSpec,
        context: Any,
        profile: ShapeProfile,
        buffers: StepBuffers,
        stream: int,
        logger: Any,
        keep: tuple[Any, ...] = (),
    ):
        """`graph`: export.json's spec of the tower (names its dims); `keep`: objects the context needs alive
        (the TensorRT runtime and engine)."""
        self.graph, self.context, self.profile, self.buffers = graph, context, profile, buffers
        self.stream, self.logger, self.keep = stream, logger, keep

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Inputs by name (cast to the engine's dtypes: float32 preprocessing into a half-precision tower, as
        OrtRunner casts) -> the graph's outputs in export.json order."""
        role = self.graph.role
        feeds = {t.name: np.asarray(feeds[t.name], self.buffers.dtypes[t.name]) for t in self.graph.inputs}
        self._check(feeds)
        for t in self.graph.inputs:
            buffer = self.buffers.upload(t.name, feeds[t.name], self.stream)
            _set_input(self.context, t.name, buffer, self.profile, role)
        for t in self.graph.outputs:
            shape = tuple(self.context.get_tensor_shape(t.name))
            if min(shape, default=0) < 0:
                raise RunnerError(f"trt: {role} output {t.name!r} has no shape before execution: {shape}")
            self.context.set_tensor_address(t.name, self.buffers.buffer(t.name, shape).ptr)
        _execute(self.context, self.stream, self.logger, role)
        hosts = [self.buffers.download(t.name, self.stream) for t in self.graph.outputs]
        self.buffers.cuda.synchronize(self.stream)
        return [host.copy() for host in hosts]  # the host buffers are reused by the next call

    def _check(self, feeds: dict[str, np.ndarray]) -> None:
        """Every named dim within the profile, refused in one line naming the limit and its build option."""
        for t in self.graph.inputs:
            shape, limits = feeds[t.name].shape, self.profile.shape(t.name)
            if len(shape) != len(t.shape):
                raise RunnerError(f"trt: {self.graph.role} input {t.name!r} must have {len(t.shape)} dims")
            for axis, dim in enumerate(t.shape):
                lo, hi = limits.min[axis], limits.max[axis]
                if isinstance(dim, str) and not lo <= shape[axis] <= hi:
                    raise RunnerError(_outside_profile(self.graph.role, dim, shape[axis], lo, hi))


class TrtRunner(BaseRunner):
    """Runs OUT/engines/<target>/decoder.engine (and vision.engine, audio.engine when built); raises
    BackendUnavailable (with the reason) where it cannot. `manifest` is the export's, as on every runner;
    `engine_manifest` the engines'."""

    name = "trt"

    def __init__(self, export_dir: str | Path, target: str = "native"):
        super().__init__()
        device_sm = local_device_sm()
        if device_sm is None:
            raise BackendUnavailable("trt: needs a CUDA GPU (the CUDA driver reports none on this machine)")
        export = ExportManifest.load(export_dir, lenient=True)
        export.verify()  # the embed graph runs from the export; its files must be what was exported
        directory = engine_dir(export_dir, target)
        manifest = read_manifest(directory)
        try:
            flavour = load_trt(manifest.flavour)
        except Gemma4CompileError as e:
            raise BackendUnavailable(f"trt: the engine needs {manifest.trt_title}: {e}") from None
        self.cuda = cuda_runtime()
        # refuses another export (naming a graph whose ONNX changed), TensorRT or GPU; -> the decoder engine.
        # The embed graph runs on the CPU from embed.onnx (below) even when the build made embed.engine.
        self.engine_file = open_engine(directory, flavour, device_sm, export=export)
        self.engine_manifest = self.engine_file.manifest
        self.engine_target = self.engine_manifest.target
        self.logger = make_logger(flavour, "WARNING")
        self.runtime, self.engine = deserialize(self.engine_file, flavour, device_sm, self.logger)
        self.profiles = self.engine_manifest.profiles
        try:
            self.stream = self.cuda.new_stream()  # every copy and execution of this runner is ordered on it
        except RunnerError as e:  # e.g. a CUDA runtime newer than the driver
            raise BackendUnavailable(str(e)) from None
        self._use_export(export)
        self.contexts = [self._context(self.engine, i) for i in range(len(self.profiles))]
        self.buffers = StepBuffers(self.cuda, _dtypes(self.engine, self.inputs + self.outputs))
        towers = [r for r in (VISION, AUDIO) if r in self.engine_manifest.graphs]
        self.towers = {r: self._tower(self.engine_file, r, flavour, device_sm) for r in towers}

    def _use_export(self, export: ExportManifest) -> None:
        """What runs from export.json: the decoder's I/O, the CPU embed graph and the placeholders it merges."""
        self.manifest = export
        self.spec = export.spec
        self.max_seq_len = export.max_seq_len or self._global_slots_max()
        self.dtype = DType.parse(export.dtype).numpy
        self.inputs = [t.name for t in export.graphs[DECODER].inputs]
        self.outputs = [t.name for t in export.graphs[DECODER].outputs]
        embed_inputs = {t.name: t for t in export.graphs[EMBED].inputs}
        soft = [embed_inputs[n] for n in (IMAGE_EMBEDS, AUDIO_EMBEDS) if n in embed_inputs]
        self.embed = EmbedGraph(export.graph_path(EMBED), soft)
        self._use_placeholders(export)

    def _context(self, engine: Any, index: int) -> Any:
        context = engine.create_execution_context()
        context.set_optimization_profile_async(index, self.stream)
        return context

    def _tower(self, decoder: EngineFile, role: str, flavour: Any, device_sm: int) -> TowerEngine:
        """The `role` engine of the directory `open_engine` checked (manifest, export, files) for the decoder."""
        graph = self.engine_manifest.graphs[role]
        file = EngineFile(decoder.dir, self.engine_manifest, decoder.dir / graph.engine_file)
        runtime, engine = deserialize(file, flavour, device_sm, self.logger)
        spec = self.manifest.graphs[role]
        buffers = StepBuffers(self.cuda, _dtypes(engine, [t.name for t in spec.inputs + spec.outputs]))
        context = self._context(engine, 0)
        return TowerEngine(
            spec, context, graph.profiles[0], buffers, self.stream, self.logger, (runtime, engine)
        )

    # ----- limits -------------------------------------------------------------------------------
    def _max(self, input_name: str, axis: int) -> int:
        return max(p.shape(input_name).max[axis] for p in self.profiles)

    def _global_slots_max(self) -> int:
        globals_ = [c.past[0] for c in self.manifest.caches if c.kind == "global"]
        return min((self._max(n, 2) for n in globals_), default=1 << 62)

    # ----- encoders (same interface as OrtRunner's) ----------------------------------------------------
    def encode_images(self, pixel_values: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """vision.engine: patches [N, P, 3p²] and positions [N, P, 2] -> soft tokens [N, P/9, E], real counts [N]."""
        soft, soft_len = self._tower_of(VISION).run(
            {"pixel_values": pixel_values, "image_position_ids": positions}
        )
        return soft, soft_len

    def encode_audio(self, features: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """audio.engine: log-mel [B, T, 128] and mask [B, T] -> soft tokens [B, T4, E], real counts [B]."""
        soft, soft_len = self._tower_of(AUDIO).run({"input_features": features, "input_features_mask": mask})
        return soft, soft_len

    def _tower_of(self, role: str) -> TowerEngine:
        if role not in self.manifest.graphs:
            raise RunnerError(f"trt: {self.manifest.path} has no {role} graph")
        if role not in self.towers:
            raise RunnerError(
                f"trt: engine {self.engine_target} has no {role} engine; build with --graphs including {role}"
            )
        return self.towers[role]

    # ----- BaseRunner ---------------------------------------------------------------------------
    def _new_caches(self, batch: int, max_len: int) -> CacheBuffers:
        if batch > self._max("past_len", 0):
            raise RunnerError(
                f"{self.name}: batch {batch} exceeds the engine's max_batch {self._max('past_len', 0)}"
            )
        if max_len > self._global_slots_max():
            raise RunnerError(
                f"{self.name}: max_len {max_len} exceeds the engine's cache_len {self._global_slots_max()}"
            )
        shapes = {past: c.shape(batch, max_len) for c in self.manifest.caches for past in c.past}
        pairs = {p: q for c in self.manifest.caches for p, q in zip(c.past, c.present)}
        caches = CacheBuffers(self.cuda, shapes, pairs, self.dtype, self.stream)
        caches.zero()  # ordered before the first step on the same stream
        return caches

    def _take_caches(self, caches: CacheBuffers, rows: np.ndarray) -> CacheBuffers:
        return caches.take(rows)

    def _join_caches(self, parts: list[CacheBuffers]) -> CacheBuffers:
        return parts[0].concat(*parts[1:])

    def _step(self, state: DecodeState, input_ids: np.ndarray, seq_len: np.ndarray) -> np.ndarray:
        rows = self._soft_rows(state, input_ids)  # checked against the placeholders
        feeds = {k: v for k, v in self.embed.run(input_ids, rows).items() if k in self.inputs}
        feeds["past_len"] = state.past_len
        feeds["seq_len"] = np.asarray(seq_len, dtype=np.int64)
        if self.takes_block_ids:  # 26B/31B exports with images
            feeds[MM_BLOCK_IDS] = self._block_ids(input_ids, seq_len)
        context = self.contexts[profile_index(self.profiles, input_ids.shape[1])]
        self._bind(context, feeds, state.caches)
        _execute(context, self.stream, self.logger, "decoder")
        logits = self.buffers.download("logits", self.stream)
        self.cuda.synchronize(self.stream)
        state.caches.swap()
        return logits.astype(np.float32)  # a copy: the host buffer is reused by the next step

    # ----- internals ----------------------------------------------------------------------------
    def _bind(self, context, feeds: dict[str, np.ndarray], caches: CacheBuffers) -> None:
        """Copy the host inputs in (on the stream), and point the context at every input and output buffer."""
        profile = self.profiles[context.active_optimization_profile]
        for name in self.inputs:
            if name in caches.past:
                buffer = caches.past[name]
            elif name in feeds:
                buffer = self.buffers.upload(name, np.asarray(feeds[name]), self.stream)
            else:
                raise RunnerError(f"{self.name}: no value for decoder input {name!r}")
            _set_input(context, name, buffer, profile, "decoder")
        for name in self.outputs:
            shape = tuple(context.get_tensor_shape(name))
            buffer = caches.present.get(name)
            if buffer is None:
                buffer = self.buffers.buffer(name, shape)
            buffer.reshape(shape)
            context.set_tensor_address(name, buffer.ptr)
