"""onnxruntime (CPU) backend: drives the exported embed and decoder graphs as export.json describes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, Gemma4CompileError
from ..export.manifest import ExportManifest
from .runners import BaseRunner, DecodeState

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


class OrtRunner(BaseRunner):
    """Runs OUT/embed.onnx + OUT/decoder.onnx; sliding caches stay exactly W slots, global ones max_len."""

    name = "ort"

    def __init__(self, export_dir: str | Path, threads: int | None = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("ort: onnxruntime is not installed") from None
        self.manifest = ExportManifest.load(export_dir)
        if not self.manifest.weights:
            raise BackendUnavailable(f"ort: {export_dir} is a graph-only export (no weights)")
        if self.manifest.dtype == "bf16":
            raise BackendUnavailable("ort: onnxruntime's CPU provider has no bf16 MatMul; validate a fp32 export")
        self.spec = self.manifest.spec
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self.embed = ort.InferenceSession(str(self.manifest.graph_path("embed")), options, providers=providers)
        self.decoder = ort.InferenceSession(str(self.manifest.graph_path("decoder")), options, providers=providers)
        decoder = self.manifest.graphs["decoder"]
        self._act = NP_DTYPES[decoder.inputs[0].dtype]
        self._outputs = [t.name for t in decoder.outputs]

    def start(self, batch: int, max_len: int) -> DecodeState:
        if max_len > self.manifest.max_seq_len:
            raise Gemma4CompileError(f"ort: {max_len} tokens exceed the export's max_seq_len {self.manifest.max_seq_len}")
        caches = {}
        for c in self.manifest.caches:
            slots = c.window if c.kind == "sliding" else max_len
            for name in c.past:
                caches[name] = np.zeros((batch, c.num_kv_heads, slots, c.head_dim), dtype=self._act)
        return DecodeState(np.zeros(batch, np.int64), max_len, caches)

    def _run(self, state: DecodeState, input_ids: np.ndarray, seq_len: np.ndarray) -> dict[str, np.ndarray]:
        if int((state.past_len + input_ids.shape[1]).max()) > state.max_len:
            raise Gemma4CompileError(f"ort: sequence exceeds the cache length {state.max_len}")
        B, S = input_ids.shape
        if self.manifest.lowering == "gqa" and B > 1 and S > 1 and state.past_len.any():
            raise Gemma4CompileError(
                "ort: a gqa-lowered export cannot prefill a batch on top of a non-empty cache "
                "(onnxruntime GroupQueryAttention); use a plain export"
            )
        embed_names = [o.name for o in self.embed.get_outputs()]
        embedded = dict(zip(embed_names, self.embed.run(None, {"input_ids": input_ids.astype(np.int64)})))
        feeds = {**embedded, "past_len": state.past_len, "seq_len": seq_len.astype(np.int64), **state.caches}
        out = dict(zip(self._outputs, self.decoder.run(None, feeds)))
        for c in self.manifest.caches:
            for past, present in zip(c.past, c.present):
                state.caches[past] = out[present]
        state.past_len = state.past_len + seq_len
        return out

    def step(self, state: DecodeState, input_ids: np.ndarray, seq_len: np.ndarray) -> np.ndarray:
        return self._run(state, input_ids, seq_len)["logits"]

    def debug_outputs(self, input_ids: np.ndarray, lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
        if not self.manifest.debug:
            raise BackendUnavailable("ort: per-layer outputs need an export with --debug-outputs")
        from .runners import _lengths

        input_ids = np.asarray(input_ids, dtype=np.int64)
        state = self.start(*input_ids.shape)
        out = self._run(state, input_ids, _lengths(input_ids, lengths))
        return {k: v.astype(np.float32) for k, v in out.items() if k.startswith(("hidden_states.", "router_logits."))}
