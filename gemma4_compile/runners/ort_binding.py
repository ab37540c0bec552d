"""Caches that stay put: onnxruntime IO bindings built once per (batch, tokens per call, parity) and reused.

The decoder reads `past_key_values.*` and writes `present.*`, which must be different buffers. Two
preallocated sets A and B take turns: a call reads A and writes B straight into B's memory (the ring update
happens in the graph, on the bound buffer), the next reads B and writes A. So a decode step moves no cache
bytes through Python or numpy, and no binding is rebuilt per step (rebuilding ~30 bindings every step cost more
than the copies it saved: benchmarks/RESULTS.md, 2026-12-03). The small inputs (ids, lengths) are numpy
buffers that the bound OrtValues share; the embed graph writes its outputs straight into the decoder's inputs.

With our attention kernel (runners/ort_kernels attention.cc; `in_place`), a one-token call reads and writes the
same set: the kernel attends before it writes and then writes only the new rows, where A -> B copied every cache
once per layer (1.6 MB per step on the mid dense config). A KV-sharing layer reads its source layer's cache after
that layer wrote its row: one token lands in slot past_len mod C, which the slot positions of that call (computed
from past_len) read as position past_len - C, outside a sliding window of C = W keys and negative (empty) in a
global cache of C = max_len, so the row is invisible there, as the old one was. A call of several tokens overwrites
slots that a query of the same call would see, so it keeps the two sets.

`state.caches` stays a dict of numpy arrays (the set the next call reads), so code that slices or concatenates
rows of a state (runtime/batching.py) keeps working: a cache dict the binding does not own is adopted as a new
set A on the next call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..export.manifest import (
    AUDIO_EMBEDS,
    BATCH,
    DECODER,
    EMBED,
    IMAGE_EMBEDS,
    MM_BLOCK_IDS,
    SEQUENCE,
    ExportManifest,
    TensorSpec,
)
from .base import empty_rows
from .rows import RowReader


def _buffer(t: TensorSpec, batch: int, seq: int) -> np.ndarray:
    dims = {BATCH: batch, SEQUENCE: seq}
    return np.zeros([dims[d] if isinstance(d, str) else d for d in t.shape], dtype=np.dtype(t.dtype))


@dataclass
class _Call:
    """Bindings and small buffers for calls of `seq` tokens; `decoder[p]` reads cache set p."""

    inputs: dict[str, np.ndarray]  # input_ids, past_len, seq_len: written in place before each call
    logits: np.ndarray
    embed: Any  # onnxruntime IOBinding
    decoder: tuple[Any, Any]
    in_place: bool  # the decoder writes the caches it reads


@dataclass
class CacheBinding:
    """Double-buffered caches of one decode state and the bindings over them."""

    sets: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]
    parity: int = 0
    calls: dict[int, _Call] = field(default_factory=dict)

    @classmethod
    def adopt(cls, caches: dict[str, np.ndarray]) -> CacheBinding:
        a = {k: np.ascontiguousarray(v) for k, v in caches.items()}
        return cls((a, {k: np.empty_like(v) for k, v in a.items()}))

    @property
    def current(self) -> dict[str, np.ndarray]:
        return self.sets[self.parity]

    def owns(self, caches: dict[str, np.ndarray]) -> bool:
        cur = self.current
        return len(caches) == len(cur) and all(caches.get(k) is v for k, v in cur.items())

    def flip(self) -> dict[str, np.ndarray]:
        self.parity ^= 1
        return dict(self.current)


class BoundRunner:
    """Runs embed + decoder through reused IO bindings; one per OrtRunner."""

    def __init__(
        self,
        ort: Any,
        sessions: dict[str, Any],
        manifest: ExportManifest,
        rows: RowReader | None = None,
        in_place: bool = False,
    ):
        """`rows`: the embed graph's tables are fed per call, read by row (rows.py). `in_place`: one-token calls
        write the caches they read (only for a decoder whose attention is our kernel: module docstring)."""
        self.ort, self.sessions, self.manifest, self.rows = ort, sessions, manifest, rows
        self.in_place = in_place
        self.embed_spec, self.decoder_spec = manifest.graphs[EMBED], manifest.graphs[DECODER]
        self.present_of = {p: q for c in manifest.caches for p, q in zip(c.past, c.present)}

    def run(
        self, binding: CacheBinding, input_ids: np.ndarray, past_len: np.ndarray, seq_len: np.ndarray
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """-> logits [B, S, V] (a copy: the bound buffer is reused) and the caches the call wrote."""
        B, S = input_ids.shape
        call = binding.calls.get(S) or binding.calls.setdefault(S, self._call(binding, B, S))
        if self.rows is not None:
            tables = self.rows.feeds(input_ids)
            input_ids = tables.pop("input_ids")
            for name, rows in tables.items():  # shapes change per call: bound afresh (a few small arrays)
                call.embed.bind_cpu_input(name, rows)
        np.copyto(call.inputs["input_ids"], input_ids)
        np.copyto(call.inputs["past_len"], past_len)
        np.copyto(call.inputs["seq_len"], seq_len)
        self.sessions[EMBED].run_with_iobinding(call.embed)
        self.sessions[DECODER].run_with_iobinding(call.decoder[binding.parity])
        return call.logits.copy(), dict(binding.current) if call.in_place else binding.flip()

    def _call(self, binding: CacheBinding, batch: int, seq: int) -> _Call:
        value = self.ort.OrtValue.ortvalue_from_numpy
        ids = _buffer(self.embed_spec.input("input_ids"), batch, seq)
        embed = self.sessions[EMBED].io_binding()
        embed.bind_ortvalue_input("input_ids", value(ids))
        for t in self.embed_spec.inputs:  # steps without images / audio: zero rows
            if t.name in (IMAGE_EMBEDS, AUDIO_EMBEDS):
                embed.bind_ortvalue_input(t.name, value(empty_rows(t)))
        shared = {}  # embed outputs = decoder inputs, one buffer each
        for t in self.embed_spec.outputs:
            shared[t.name] = value(_buffer(t, batch, seq))
            embed.bind_ortvalue_output(t.name, shared[t.name])
        small = {n: np.zeros(batch, np.int64) for n in ("past_len", "seq_len")}
        if any(t.name == MM_BLOCK_IDS for t in self.decoder_spec.inputs):  # bound calls carry no images
            small[MM_BLOCK_IDS] = np.full((batch, seq), -1, np.int64)
        logits = _buffer(next(t for t in self.decoder_spec.outputs if t.name == "logits"), batch, seq)
        feeds = {**shared, **{n: value(a) for n, a in small.items()}}
        in_place = self.in_place and seq == 1
        decoder = tuple(self._decoder_io(feeds, value(logits), binding, p, in_place) for p in (0, 1))
        return _Call({"input_ids": ids, **small}, logits, embed, decoder, in_place)

    def _decoder_io(
        self, feeds: dict[str, Any], logits: Any, binding: CacheBinding, parity: int, in_place: bool
    ) -> Any:
        value = self.ort.OrtValue.ortvalue_from_numpy
        io = self.sessions[DECODER].io_binding()
        for name, v in feeds.items():
            io.bind_ortvalue_input(name, v)
        io.bind_ortvalue_output("logits", logits)
        past, present = binding.sets[parity], binding.sets[parity if in_place else parity ^ 1]
        for name, buf in past.items():
            io.bind_ortvalue_input(name, value(buf))
            io.bind_ortvalue_output(self.present_of[name], value(present[name]))
        return io
