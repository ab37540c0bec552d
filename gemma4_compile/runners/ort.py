"""onnxruntime backend: drives an export's graphs as export.json describes them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import DType
from ..errors import BackendUnavailable, RunnerError
from ..export.manifest import (
    AUDIO,
    AUDIO_EMBEDS,
    DECODER,
    EMBED,
    IMAGE_EMBEDS,
    MM_BLOCK_IDS,
    VISION,
    ExportManifest,
)
from ..passes.lowerings import lowering_refusal
from ..quant.formats import GRAPH_NBITS
from .base import BaseRunner, DecodeState, empty_rows, lengths_of
from .huge_pages import HugePages, available_memory
from .ort_binding import BoundRunner, CacheBinding
from .ort_cache import optimized_graph, with_data_folder
from .rows import row_reader


def _rewrite(
    fuse: bool, decode_ring: bool, moe_step: bool, attention: bool
) -> tuple[Callable[[Path], bytes], str]:
    """The decoder rewrite and its cache tag. onnx-ir and onnxscript cost ~40 MB of RSS, paid only by a start
    that rewrites (no session-cache hit): imported at the call."""

    def rewrite(path: Path) -> bytes:
        from ..passes.share_shapes import shared_decoder

        return shared_decoder(path, fuse, decode_ring, moe_step, attention)

    # the tag keys saved sessions (ort_cache.py): change it whenever the rewrite changes what it writes
    tag = "shared3" + "-fused" * fuse + "-ring2" * decode_ring + "-moestep2" * moe_step + "-attn2" * attention
    return rewrite, tag


def _runs_dequantized_copy(manifest: ExportManifest) -> bool:
    """onnxruntime has no FP4 type: an nvfp4 export's decoder runs as a dequantized copy (ort_fp4.py), unrewritten."""
    return manifest.quant is not None and "nvfp4" in manifest.quant.formats


def _kernels(manifest: ExportManifest) -> tuple[list[str], str]:
    """(the runners/ort_kernels ops an export's decoder runs on: `attention` and its MoE kernel; why none)."""
    if manifest.activation_dtype is not DType.FP32:
        return [], "the kernels are fp32"
    if _runs_dequantized_copy(manifest):
        return [], "an nvfp4 export runs as a dequantized copy"
    moe, _ = _moe_kernel(manifest)
    return ["attention", *([moe] if moe else [])], ""


def _moe_kernel(manifest: ExportManifest) -> tuple[str | None, str]:
    """(the runners/ort_kernels op a fp32 export's decoder MoE runs on, or None; why not)."""
    quant = manifest.quant
    if not manifest.spec.enable_moe_block:
        return None, "no MoE"
    experts = quant.roles.get("moe_experts") if quant is not None and quant.graph == GRAPH_NBITS else None
    if experts == "int8":
        return None, "its 8-bit experts run as MatMulNBits"
    return ("moe_nbits" if experts == "int4" else "moe_step"), ""


# ops that read the stacked experts as they are (ours, and the fp32 body's per-expert Gather): no prepacked copy
_READ_IN_PLACE = {"MoEStep", "MoENBits", "Gather"}


def all_nodes(graph: Any) -> Iterator[Any]:
    """Every node of an onnx GraphProto, its subgraphs' too (If branches, Loop bodies), parents first."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == a.GRAPH:
                yield from all_nodes(a.g)


def _expert_weights(model: Any) -> list:
    """The external initializers of 3 or more dims that only ops of _READ_IN_PLACE read (the stacked experts)."""
    import onnx

    readers: dict[str, set[str]] = {}
    for node in all_nodes(model.graph):
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    return [
        t
        for t in model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        and len(t.dims) >= 3
        and readers.get(t.name)
        and readers[t.name] <= _READ_IN_PLACE
    ]


@contextlib.contextmanager
def _single_threaded(options: Any, on: bool) -> Iterator[None]:
    """`options` with one intra-op thread while a session is created from them (they are copied at creation).
    The embed graph only gathers rows: with a pool of its own, its worker spun on the second core while the
    decoder ran, and a 2-thread batch-4 prefill took 1.2x as long (benchmarks/RESULTS.md)."""
    if not on:
        yield
        return
    keep = options.intra_op_num_threads
    options.intra_op_num_threads = 1
    try:
        yield
    finally:
        options.intra_op_num_threads = keep


class OrtRunner(BaseRunner):
    """Runs OUT/embed.onnx + OUT/decoder.onnx; sliding caches stay exactly W slots, global ones max_len."""

    name = "ort"

    def __init__(
        self,
        export_dir: str | Path,
        threads: int | None = None,
        providers: list[str] | None = None,
        options: Any = None,
        io_binding: bool = True,
        session_cache: str | Path | None = None,
        read_rows: bool = True,
        share_shapes: bool = True,
        fuse: bool = True,
        decode_ring: bool = True,
        kernels: bool = True,
        huge_pages: bool = True,
    ):
        """`options`: an onnxruntime SessionOptions to start from (profiling, logging); threads apply on top.
        `io_binding`: keep caches in reused bound buffers (ort_binding.py); False feeds numpy per call.
        `session_cache`: a folder for the decoder graph as onnxruntime optimized it (ort_cache.py).
        `read_rows`: feed the embed graph's tables row by row from the data file (rows.py); False: let
        onnxruntime load them.
        `share_shapes`: give the decoder session its graph with the attention bodies inlined and their masks
        and shape arithmetic computed once per call instead of once per layer (passes/share_shapes.py).
        `fuse`: in that rewrite, also run each RMSNorm and rotary embedding as one onnxruntime kernel
        (passes/ort_fusions.py; the float results move by an ulp).
        `decode_ring`: in that rewrite, a one-token call writes its cache row with a scatter instead of
        rebuilding every slot (ops/attention/body.py `decode_ring`; the same values).
        `kernels`: in that rewrite, a fp32 export's attention runs as our `gemma4_ort::SlidingWindowAttention`
        CPU kernel, an MoE export's calls of up to 16 tokens as `gemma4_ort::MoEStep`, and 4-bit experts as
        `gemma4_ort::MoENBits`, where the library is built (runners/ort_kernels; fp32 rounding order differs);
        `self.kernels` names them ("attention+moe_step"), or says why none is used.
        `huge_pages`: put the memory the sessions allocate (weights, prepacked copies) on transparent huge pages
        where Linux allows it (huge_pages.py; the same values); `self.huge_pages` says how much, or why not. An
        MoE export's experts are then read into arrays of the runner's, added to `options` as initializers
        (not with `session_cache`, whose graph has its own weights file)."""
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("ort: onnxruntime is not installed") from None
        self.manifest = ExportManifest.load(export_dir)
        self.manifest.verify()  # hashes of graphs and weights, export.json's seal (docs/export-format.md)
        if not self.manifest.weights:
            raise BackendUnavailable(f"ort: {export_dir} is a graph-only export (no weights)")
        if self.manifest.activation_dtype is DType.BF16:
            raise BackendUnavailable(
                "ort: onnxruntime's CPU provider has no bf16 MatMul; validate a fp32 export"
            )
        self.spec, self.max_seq_len = self.manifest.spec, self.manifest.max_seq_len
        if options is None:
            options = ort.SessionOptions()
            options.log_severity_level = 3  # errors only: optimizer notices are not for users
        if threads:
            options.intra_op_num_threads = threads
        providers = providers or ["CPUExecutionProvider"]
        self._session_cache = Path(session_cache) if session_cache else None
        cpu_only = providers == ["CPUExecutionProvider"]
        self._libraries, self.kernels = self._kernel_libraries(kernels and share_shapes, cpu_only)
        try:
            for library in self._libraries:
                options.register_custom_ops_library(str(library))
        except Exception as e:  # onnxruntime's Fail: a library it cannot load; run the bodies instead
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self._libraries, self.kernels = (), f"unavailable: cannot load {library.name}: {reason}"
        ran = set(self.kernels.split("+")) if self._libraries else set()
        moe_step = bool(ran & {"moe_step", "moe_nbits"})
        self._rewrite = _rewrite(fuse, decode_ring, moe_step, "attention" in ran) if share_shapes else None
        decoder = self.manifest.graphs[DECODER]
        self._act = self.manifest.activation_dtype.numpy
        self._outputs = [t.name for t in decoder.outputs]
        self._embed_outputs = [t.name for t in self.manifest.graphs[EMBED].outputs]
        embed_inputs = {t.name: t for t in self.manifest.graphs[EMBED].inputs}
        # what calls without images / audio feed the embed graph's soft-token inputs
        self._no_rows = {
            n: empty_rows(embed_inputs[n]) for n in (IMAGE_EMBEDS, AUDIO_EMBEDS) if n in embed_inputs
        }
        self._use_placeholders(self.manifest)
        self._read_rows, self.rows = read_rows, None  # the placeholders above are what rows.py keeps
        pages, self._huge_pages = (HugePages() if huge_pages else None), huge_pages
        self._in_memory: dict[str, Any] = {}  # weights read into our memory for onnxruntime to use in place
        self.sessions = {}
        # the decoder last: the weights it takes from our memory are added to the shared `options`
        for role in sorted(self.manifest.graphs, key=lambda r: r == DECODER):
            with _single_threaded(options, role == EMBED):
                self.sessions[role] = self._session(ort, role, options, providers)
        self.huge_pages = str(pages.apply()) if pages else "off"
        # host buffers bound in place suit the CPU provider; debug exports have outputs the binding leaves out
        bind = io_binding and cpu_only and not self.manifest.debug
        in_place = "attention" in ran  # one-token calls may write the caches they read (ort_binding.py)
        self._bound = BoundRunner(ort, self.sessions, self.manifest, self.rows, in_place) if bind else None

    def _kernel_libraries(self, wanted: bool, cpu_only: bool) -> tuple[tuple[Path, ...], str]:
        """(libraries to register, what `self.kernels` reports: the kernels joined by "+", or why none), on the
        CPU provider alone."""
        if not wanted:
            return (), "off"
        kernels, unused = ([], "other providers") if not cpu_only else _kernels(self.manifest)
        if not kernels:
            return (), f"none needed ({unused})"
        from . import ort_kernels

        try:
            return (ort_kernels.library(),), "+".join(kernels)
        except ort_kernels.KernelsUnavailable as e:
            return (), f"unavailable: {e}"

    def _session(self, ort, role: str, options, providers: list[str]):
        path = self.manifest.graph_path(role)
        try:
            if role == DECODER and _runs_dequantized_copy(self.manifest):
                from .ort_fp4 import dequantized_copy  # onnx-ir: loaded only for the exports that need it

                with dequantized_copy(path) as tmp:
                    return ort.InferenceSession(str(Path(tmp) / path.name), options, providers=providers)
            if role == EMBED and self._read_rows:
                found = row_reader(path, tuple(self._placeholders().values()), self.spec.pad_token_id)
                if found is not None:
                    self.rows, graph = found
                    return ort.InferenceSession(graph, options, providers=providers)
            rewrite, tag = self._rewrite if role == DECODER and self._rewrite else (None, "")
            if self._session_cache and role == DECODER:  # the graph whose optimization takes the time
                path = optimized_graph(
                    ort, self.manifest, role, providers, self._session_cache, rewrite, tag, self._libraries
                )
            elif rewrite is not None:  # every graph of an export shares its folder, so `options` may say it
                graph = rewrite(path)
                if self._huge_pages:
                    self._read_experts(ort, graph, path.parent, options)
                data_folder = with_data_folder(options, path.parent)
                return ort.InferenceSession(graph, data_folder, providers=providers)
            return ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime's Fail / InvalidGraph / NoSuchFile...: a file it cannot load
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RunnerError(f"ort: cannot load {path}: {reason}") from None

    def _read_experts(self, ort, graph: bytes, folder: Path, options) -> None:
        """The MoE experts of a rewritten decoder graph, read into arrays of ours that onnxruntime uses in place
        (`add_initializer`), so that huge_pages.py can back them with huge pages: left to onnxruntime, a weight it
        does not prepack stays a private mapping of the weights file, which MADV_COLLAPSE refuses (MoE decode
        0.94x with them in memory, benchmarks/RESULTS.md eighth session). Only experts that take at most half the
        available memory: file pages can be dropped under pressure, our copies cannot."""
        import onnx

        experts = [
            (t, onnx.helper.tensor_dtype_to_np_dtype(t.data_type), int(np.prod(t.dims)))
            for t in _expert_weights(onnx.load_from_string(graph))
        ]
        available = available_memory()
        if available is None or 2 * sum(dtype.itemsize * n for _, dtype, n in experts) > available:
            return  # file pages the kernel may drop under pressure: an MoE larger than RAM still runs
        for tensor, dtype, n in experts:
            where = {e.key: e.value for e in tensor.external_data}
            at = folder / where["location"]
            array = np.fromfile(at, dtype=dtype, count=n, offset=int(where.get("offset", 0))).reshape(
                tensor.dims
            )
            value = ort.OrtValue.ortvalue_from_numpy(array)
            self._in_memory[tensor.name] = (array, value)  # both must outlive the session
            options.add_initializer(tensor.name, value)

    def encode_images(self, pixel_values: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """vision.onnx: patches [N, P, 3p²] and positions [N, P, 2] -> soft tokens [N, P/9, E], real counts [N]."""
        if VISION not in self.sessions:
            raise RunnerError(f"ort: {self.manifest.path} has no vision graph")
        feeds = {"pixel_values": pixel_values.astype(self._act), "image_position_ids": positions}
        soft, soft_len = self.sessions[VISION].run(None, feeds)
        return soft, soft_len

    def encode_audio(self, features: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """audio.onnx: log-mel [B, T, 128] and mask [B, T] -> soft tokens [B, T4, E], real counts [B]."""
        if AUDIO not in self.sessions:
            raise RunnerError(f"ort: {self.manifest.path} has no audio graph")
        feeds = {"input_features": features.astype(self._act), "input_features_mask": mask}
        soft, soft_len = self.sessions[AUDIO].run(None, feeds)
        return soft, soft_len

    def _new_caches(self, batch: int, max_len: int) -> dict[str, np.ndarray]:
        return {
            name: np.zeros(c.shape(batch, max_len), dtype=self._act)
            for c in self.manifest.caches
            for name in c.past
        }

    def _take_caches(self, caches: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
        return {name: cache[rows] for name, cache in caches.items()}

    def _join_caches(self, parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _refuse(self, state: DecodeState, input_ids: np.ndarray) -> None:
        B, S = input_ids.shape
        refusal = lowering_refusal(self.manifest.lowering, B, S, bool(state.past_len.any()))
        if refusal:
            raise RunnerError(f"ort: {refusal}")

    def _run(
        self,
        state: DecodeState,
        input_ids: np.ndarray,
        seq_len: np.ndarray,
        rows: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        self._refuse(state, input_ids)
        feeds = {"input_ids": input_ids, **self._no_rows}
        feeds.update({n: r.astype(self._act, copy=False) for n, r in (rows or {}).items()})
        if self.rows is not None:
            feeds.update(self.rows.feeds(input_ids))
        embedded = dict(zip(self._embed_outputs, self.sessions[EMBED].run(self._embed_outputs, feeds)))
        feeds = {**embedded, "past_len": state.past_len, "seq_len": seq_len, **state.caches}
        if self.takes_block_ids:
            feeds[MM_BLOCK_IDS] = self._block_ids(input_ids, seq_len)
        out = dict(zip(self._outputs, self.sessions[DECODER].run(self._outputs, feeds)))
        for c in self.manifest.caches:
            for past, present in zip(c.past, c.present):
                state.caches[past] = out[present]
        return out

    def _step(self, state: DecodeState, input_ids: np.ndarray, seq_len: np.ndarray) -> np.ndarray:
        rows = self._soft_rows(state, input_ids)
        if self._bound is None or rows:  # a prompt with images or audio: once per sequence, unbound
            return self._run(state, input_ids, seq_len, rows)["logits"]
        self._refuse(state, input_ids)
        binding = state.extra.get("io")
        if binding is None or not binding.owns(state.caches):  # a new state, or rows sliced by the caller
            binding = state.extra["io"] = CacheBinding.adopt(state.caches)
        logits, state.caches = self._bound.run(binding, input_ids, state.past_len, seq_len)
        return logits

    def debug_outputs(
        self, input_ids: np.ndarray, lengths: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        if not self.manifest.debug:
            raise BackendUnavailable("ort: per-layer outputs need an export with --debug-outputs")
        input_ids = np.asarray(input_ids, dtype=np.int64)
        state = self.start(*input_ids.shape)
        input_ids, seq_len = self._checked(state, input_ids, lengths_of(input_ids, lengths))
        out = self._run(state, input_ids, seq_len, self._soft_rows(state, input_ids))
        return {
            k: v.astype(np.float32)
            for k, v in out.items()
            if k.startswith(("hidden_states.", "router_logits."))
        }
