"""Backends behind one interface: `logits(ids)` and `generate(ids, steps)`, numpy in, numpy out.

A backend implements two primitives, `_new_caches(batch, max_len)` and `_step(state, ids, seq_len)` (run S new
tokens through the caches, return their logits). The public `start` / `step` around them own the checks every
backend needs (cache length, shapes, lengths) and the position bookkeeping, once, as Polygraphy's runners do;
`logits` and `generate` are written once on top. Rows of a batch may have different lengths: `seq_len[b]`
tokens of row b are real, the rest is right padding. Backends whose states can be batched continuously
(runtime/batching.py) also implement `_take_caches` and `_join_caches`, behind `take_rows` and `join_states`.

This module imports neither torch nor transformers: runners of an export must not pay for them.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BackendUnavailable, RunnerError
from ..export.manifest import AUDIO_EMBEDS, DECODER, EMBED, IMAGE_EMBEDS, MM_BLOCK_IDS


@dataclass
class DecodeState:
    """Per-sequence bookkeeping shared by all runners; `caches` is backend-specific."""

    past_len: np.ndarray  # [B] int64
    max_len: int
    caches: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    # the runner that made it: its caches are in that runner's format, so that runner selects and joins its
    # rows (a caller holding only the state, or a wrapper of start/step, still reaches the right one)
    runner: BaseRunner | None = field(default=None, repr=False, compare=False)

    @property
    def batch(self) -> int:
        return int(self.past_len.shape[0])


def _bounds(a: np.ndarray) -> tuple[int, int]:
    """(min, max) of an int array, (0, 0) when empty. A decode step's few ids go through Python's min / max: each
    numpy call costs microseconds of a step (benchmarks/RESULTS.md, ninth session)."""
    if a.size > 1024:
        return int(a.min()), int(a.max())
    values = a.ravel().tolist()
    return (min(values), max(values)) if values else (0, 0)


def lengths_of(input_ids: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
    """Per-row real lengths of a right-padded [B, S] batch (all S when not given)."""
    B, S = input_ids.shape
    if lengths is None:
        return np.full(B, S, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.shape != (B,) or lengths.min() < 1 or lengths.max() > S:
        raise RunnerError(f"lengths must be {B} values in [1, {S}], got {lengths.tolist()}")
    return lengths


def image_block_ids(input_ids: np.ndarray, image_token_id: int, seq_len: np.ndarray) -> np.ndarray:
    """`mm_block_ids` [B, S] of one call: k for the k-th run of consecutive image placeholders of a row's real
    tokens, -1 elsewhere (text, audio, padding; decode steps are all -1). As transformers numbers the runs
    from mm_token_type_ids; only equality within a row matters to the mask."""
    real = np.arange(input_ids.shape[1])[None, :] < np.asarray(seq_len)[:, None]
    image = (input_ids == image_token_id) & real
    starts = image & ~np.pad(image, ((0, 0), (1, 0)))[:, :-1]
    return np.where(image, np.cumsum(starts, axis=1) - 1, -1).astype(np.int64)


def split_image_run(input_ids: np.ndarray, image_token_id: int, seq_len: np.ndarray) -> int | None:
    """The first row whose real tokens end with an image placeholder, else None. Every image run is closed by
    its end-of-image token, so such a call (a prefill chunk) cuts one image block in two."""
    last = input_ids[np.arange(input_ids.shape[0]), np.maximum(np.asarray(seq_len) - 1, 0)]
    rows = np.flatnonzero((last == image_token_id) & (np.asarray(seq_len) > 0))
    return int(rows[0]) if rows.size else None


def empty_rows(t: Any) -> np.ndarray:
    """Zero rows of a [rows, width] input (TensorSpec): what a text-only call feeds the embed graph's
    `image_embeds`."""
    if t.dtype == "bfloat16":  # numpy has no bf16; onnx (a dependency) brings ml_dtypes
        import ml_dtypes

        return np.zeros((0, t.shape[1]), ml_dtypes.bfloat16)
    return np.zeros((0, t.shape[1]), np.dtype(t.dtype))


class BaseRunner(abc.ABC):
    """Template for backends; subclasses set `spec` and `max_seq_len` and implement `_new_caches` and `_step`."""

    name = "base"
    spec: Any  # Gemma4Spec
    max_seq_len: int
    engine_target: str | None = None  # the TensorRT engine (engines/<target>/) this runner executes, if any
    # exports whose embed graph merges images: the placeholder id (it may lie outside the vocabulary)
    image_token_id: int | None = None
    image_refusal: str | None = None  # why this export's image prompts cannot run, if they cannot
    audio_token_id: int | None = None  # exports whose embed graph merges audio too
    audio_refusal: str | None = None
    # 26B/31B exports with images: the decoder takes `mm_block_ids` (export.json multimodal.decoder_mask)
    takes_block_ids: bool = False

    def __init__(self) -> None:
        self.last_latency_s = 0.0

    def _use_placeholders(self, export: Any) -> None:
        """From export.json (an ExportManifest): the placeholder ids the embed graph merges, whether the decoder
        takes `mm_block_ids`, and the refusal of image prompts a 26B/31B export without it needs."""
        embed_inputs = {t.name for t in export.graphs[EMBED].inputs}
        self.takes_block_ids = MM_BLOCK_IDS in {t.name for t in export.graphs[DECODER].inputs}
        mm = export.multimodal
        if AUDIO_EMBEDS in embed_inputs and mm is not None and mm.audio is not None:
            self.audio_token_id = mm.audio.audio
        if IMAGE_EMBEDS in embed_inputs and mm is not None:
            self.image_token_id = mm.tokens.image
            if mm.bidirectional_image_blocks and not self.takes_block_ids:  # never the wrong mask
                self.image_refusal = (
                    f"{self.name}: this export's decoder has no mm_block_ids input, which image runs on 26B/31B "
                    "need; re-export it with this version"
                )

    # ----- backend primitives -------------------------------------------------------------------
    @abc.abstractmethod
    def _new_caches(self, batch: int, max_len: int) -> Any:
        """Zeroed caches for `batch` rows of up to `max_len` tokens."""

    @abc.abstractmethod
    def _step(self, state: DecodeState, input_ids: np.ndarray, seq_len: np.ndarray) -> np.ndarray:
        """Run checked [B, S] int64 tokens through the caches -> logits [B, S, V] float32 (past_len not yet
        advanced: the template does that)."""

    # ----- checked entry points -----------------------------------------------------------------
    def start(self, batch: int, max_len: int) -> DecodeState:
        """Fresh caches for `batch` rows of up to `max_len` tokens."""
        if batch < 1:
            raise RunnerError(f"{self.name}: batch must be at least 1, got {batch}")
        if not 1 <= max_len <= self.max_seq_len:
            raise RunnerError(f"{self.name}: {max_len} tokens exceed the max_seq_len {self.max_seq_len}")
        return DecodeState(np.zeros(batch, np.int64), max_len, self._new_caches(batch, max_len), runner=self)

    def step(self, state: DecodeState, input_ids: np.ndarray, seq_len: np.ndarray) -> np.ndarray:
        """Run [B, S] tokens (row b: seq_len[b] real ones) -> logits [B, S, V] float32; advances the state."""
        input_ids, seq_len = self._checked(state, input_ids, seq_len)
        logits = self._step(state, input_ids, seq_len)
        state.past_len = state.past_len + seq_len
        return logits

    def _checked(
        self, state: DecodeState, input_ids: np.ndarray, seq_len: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        seq_len = np.asarray(seq_len, dtype=np.int64)
        if input_ids.ndim != 2 or input_ids.shape[0] != state.batch:
            raise RunnerError(
                f"{self.name}: input_ids must be [{state.batch}, S], got {list(input_ids.shape)}"
            )
        lengths = seq_len.tolist() if seq_len.shape == (state.batch,) else [-1]
        if min(lengths) < 0 or max(lengths) > input_ids.shape[1]:
            raise RunnerError(
                f"{self.name}: seq_len must be {state.batch} values in [0, {input_ids.shape[1]}]"
            )
        if max(state.past_len.tolist()) + input_ids.shape[1] > state.max_len:
            raise RunnerError(f"{self.name}: sequence exceeds the cache length {state.max_len}")
        vocab = getattr(self.spec, "vocab_size", None)
        low, high = _bounds(input_ids)
        if not vocab or (low >= 0 and high < vocab):
            return input_ids, seq_len  # every id a token: no placeholder to look for
        bad = (input_ids < 0) | (input_ids >= (vocab or np.iinfo(np.int64).max))
        for placeholder in self._placeholders().values():
            bad &= input_ids != placeholder
        if vocab and bad.any():
            raise RunnerError(f"{self.name}: token ids must be in [0, {vocab}), got {int(input_ids[bad][0])}")
        return input_ids, seq_len

    # ----- rows of states (continuous batching: sequences join and leave a running batch) ----------------
    def take_rows(self, state: DecodeState, rows: np.ndarray) -> DecodeState:
        """A new state holding rows `rows` (batch indices, in that order) of `state`: caches and positions."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or not rows.size or rows.min() < 0 or rows.max() >= state.batch:
            raise RunnerError(f"{self.name}: rows must be indices in [0, {state.batch}), got {rows.tolist()}")
        caches = self._take_caches(state.caches, rows)
        return DecodeState(state.past_len[rows], state.max_len, caches, runner=self)

    def join_states(self, states: list[DecodeState]) -> DecodeState:
        """One new state holding the rows of `states`, in order; all must have the same cache length."""
        lengths = sorted({s.max_len for s in states})
        if len(lengths) != 1:
            raise RunnerError(f"{self.name}: states to join must share one cache length, got {lengths}")
        past_len = np.concatenate([s.past_len for s in states])
        return DecodeState(past_len, lengths[0], self._join_caches([s.caches for s in states]), runner=self)

    def _take_caches(self, caches: Any, rows: np.ndarray) -> Any:
        """Rows `rows` of caches made by `_new_caches` / `_step` (new caches: the source stays valid)."""
        raise BackendUnavailable(f"{self.name}: cannot select rows of its caches (no continuous batching)")

    def _join_caches(self, parts: list[Any]) -> Any:
        """The rows of `parts`, in order, as new caches."""
        raise BackendUnavailable(f"{self.name}: cannot join caches (no continuous batching)")

    # ----- soft tokens (exports whose embed graph merges images and audio) --------------------------
    def attach_images(self, state: DecodeState, image_embeds: np.ndarray) -> None:
        """The next `step` holds image placeholders: its soft tokens [N, E] in prompt order (vision.onnx's
        real rows, concatenated), consumed by that step."""
        self._attach(state, IMAGE_EMBEDS, image_embeds, "images", "vision", self.image_refusal)

    def attach_audio(self, state: DecodeState, audio_embeds: np.ndarray) -> None:
        """The next `step` holds audio placeholders: its soft tokens [M, E] in prompt order (audio.onnx's
        real rows, clip after clip), consumed by that step."""
        self._attach(state, AUDIO_EMBEDS, audio_embeds, "audio", "audio", self.audio_refusal)

    def _attach(
        self, state: DecodeState, name: str, rows: np.ndarray, what: str, tower: str, refusal: str | None
    ) -> None:
        if name not in self._placeholders():
            raise RunnerError(
                f"{self.name}: takes no {what} (no {tower} graph merged by the export, or a backend without them)"
            )
        if refusal:
            raise RunnerError(refusal)
        state.extra[name] = rows

    def _placeholders(self) -> dict[str, int]:
        """The embed graph's soft-token inputs this runner feeds -> their placeholder ids."""
        ids = {IMAGE_EMBEDS: self.image_token_id, AUDIO_EMBEDS: self.audio_token_id}
        return {name: i for name, i in ids.items() if i is not None}

    def _block_ids(self, input_ids: np.ndarray, seq_len: np.ndarray) -> np.ndarray:
        """This call's `mm_block_ids` [B, S], refusing in one line a call that splits an image block (the
        block's later tokens would be missing from its earlier ones' keys)."""
        image = self.image_token_id if self.image_token_id is not None else -2  # -2: no id matches
        row = split_image_run(input_ids, image, seq_len)
        if row is not None:
            raise RunnerError(
                f"{self.name}: row {row} of this call ends inside an image run; a prefill chunk must hold whole "
                "image blocks (through their end-of-image token) on this export"
            )
        return image_block_ids(input_ids, image, seq_len)

    def _soft_rows(self, state: DecodeState, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The rows attached for this step by input name (only non-empty ones), each checked against its
        placeholder count."""
        out = {}
        for name, placeholder in self._placeholders().items():
            rows = state.extra.pop(name, None)
            wanted, given = int((input_ids == placeholder).sum()), 0 if rows is None else len(rows)
            if wanted != given:
                noun = name.removesuffix("_embeds")
                raise RunnerError(
                    f"{self.name}: the prompt has {wanted} {noun} placeholders but {given} {noun} soft tokens "
                    "were given"
                )
            if given:
                out[name] = rows
        return out

    # ----- shared API ---------------------------------------------------------------------------
    def timed_step(self, state: DecodeState, input_ids: np.ndarray, seq_len: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.step(state, input_ids, seq_len)
        self.last_latency_s = time.perf_counter() - t0
        return out

    def logits(self, input_ids: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        input_ids = np.asarray(input_ids, dtype=np.int64)
        seq_len = lengths_of(input_ids, lengths)
        state = self.start(input_ids.shape[0], input_ids.shape[1])
        return self.timed_step(state, input_ids, seq_len)

    def generate_with_logits(
        self, input_ids: np.ndarray, steps: int, lengths: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Greedy decode: prefill once, then one-token steps. -> tokens [B, steps], their logits [B, steps, V]."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        seq_len = lengths_of(input_ids, lengths)
        B = input_ids.shape[0]
        state = self.start(B, input_ids.shape[1] + steps)
        logits = self.timed_step(state, input_ids, seq_len)
        last = logits[np.arange(B), seq_len - 1]  # [B, V]
        tokens, chosen = [], []
        ones = np.ones(B, dtype=np.int64)
        for i in range(steps):
            nxt = last.argmax(-1).astype(np.int64)
            tokens.append(nxt)
            chosen.append(last)
            if i + 1 < steps:
                last = self.timed_step(state, nxt[:, None], ones)[:, 0]
        return np.stack(tokens, 1), np.stack(chosen, 1)

    def generate(self, input_ids: np.ndarray, steps: int, lengths: np.ndarray | None = None) -> np.ndarray:
        return self.generate_with_logits(input_ids, steps, lengths)[0]

    def debug_outputs(
        self, input_ids: np.ndarray, lengths: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Per-layer tensors by name: `hidden_states.I` [B, S, H] (residual after layer I) and, on MoE layers,
        `router_logits.I` [B, S, E]. Backends without them raise BackendUnavailable."""
        raise BackendUnavailable(f"{self.name}: per-layer debug outputs are not available")

    def hidden_states(self, input_ids: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """Residual stream after each decoder layer, [L, B, S, H] float32 (for localizing divergence)."""
        out = self.debug_outputs(input_ids, lengths)
        return np.stack([out[f"hidden_states.{i}"] for i in range(self.spec.num_hidden_layers)])

    def router_logits(
        self, input_ids: np.ndarray, lengths: np.ndarray | None = None
    ) -> dict[int, np.ndarray]:
        """MoE router logits per layer index, [B, S, E] float32 (for routing agreement)."""
        out = self.debug_outputs(input_ids, lengths)
        return {int(k.split(".")[1]): v for k, v in out.items() if k.startswith("router_logits.")}
