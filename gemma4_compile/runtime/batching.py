"""Continuous batching: one thread steps the runner for up to `max_batch` sequences at a time.

Each active sequence is one row of a shared decode state. Newcomers are prefilled together in a fresh state
(right-padded to the longest prompt, `seq_len` marks the real tokens) and their rows are appended to the
running state; finished or cancelled rows are dropped, both through the runner's `take_rows` / `join_states`
(numpy caches on onnxruntime, device caches on TensorRT). Rows enter and leave only between steps, so the
caches are copied only when the membership changes. Every row keeps its own `past_len`, its own global-cache
slots and its own W-slot sliding ring. A row's tokens therefore do not depend on what else is running.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .sampler import Sampler, SamplingParams

if TYPE_CHECKING:
    from ..runners.base import DecodeState

# emit(token, None) for each generated token; emit(None, finish_reason) once at the end
Emit = Callable[[int | None, str | None], None]


@dataclass(eq=False)
class Job:
    """One sequence to generate."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    params: SamplingParams
    stop_ids: frozenset[int]
    emit: Emit
    # soft tokens [N, E] of the prompt's images / audio clips in prompt order (runtime/images.py); such a
    # sequence is prefilled on its own, so its rows are all the step's placeholders
    image_embeds: np.ndarray | None = None
    audio_embeds: np.ndarray | None = None
    generated: int = 0
    next_token: int = -1
    cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params)

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def has_media(self) -> bool:
        return self.image_embeds is not None or self.audio_embeds is not None

    def accept(self, logits: np.ndarray) -> bool:
        """Choose the next token from `logits`, emit it; -> True while the sequence goes on."""
        token = self.sampler(logits)
        if token in self.stop_ids:
            self.emit(None, "stop")
            return False
        self.generated += 1
        self.next_token = token
        self.emit(token, None)
        if self.generated >= self.max_new_tokens:
            self.emit(None, "length")
            return False
        return True


class BatchEngine:
    """Owns the runner; `submit` from any thread, tokens come back through each sequence's `emit`."""

    def __init__(self, runner: Any, max_batch: int, max_len: int):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.runner, self.max_batch, self.max_len = runner, max_batch, max_len
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.rows: list[Job] = []
        self.state: DecodeState | None = None
        self.steps = 0  # decode steps run (batch sizes are in `batch_sizes`)
        self.batch_sizes: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gemma4-batch-engine", daemon=True)

    def start(self) -> BatchEngine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> Job:
        self.waiting.put(job)
        return job

    @property
    def active(self) -> int:
        return len(self.rows)

    # ----- the loop (engine thread only) -----------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            newcomers = self._admit()
            try:
                if newcomers:
                    self._prefill(newcomers)
                self._drop_finished()
                if self.rows:
                    self._decode()
                    self._drop_finished()
            except Exception as e:  # a failed step ends its sequences with an error; the engine goes on
                for job in {*self.rows, *newcomers}:
                    job.emit(None, f"error: {type(e).__name__}: {e}")
                self.rows, self.state = [], None

    def _admit(self) -> list[Job]:
        """Waiting sequences that fit the free rows; blocks briefly when nothing runs."""
        out: list[Job] = []
        while len(self.rows) + len(out) < self.max_batch:
            try:
                seq = (
                    self.waiting.get(timeout=0.05) if not self.rows and not out else self.waiting.get_nowait()
                )
            except queue.Empty:
                break
            if not seq.cancelled.is_set():
                out.append(seq)
        return out

    def _prefill(self, seqs: list[Job]) -> None:
        """Text prompts together in one call; a prompt with images or audio alone, its soft tokens attached."""
        text = [s for s in seqs if not s.has_media]
        for group in [text] * bool(text) + [[s] for s in seqs if s.has_media]:
            self._prefill_group(group)

    def _prefill_group(self, seqs: list[Job]) -> None:
        lengths = np.array([len(s.prompt_ids) for s in seqs], dtype=np.int64)
        ids = np.zeros((len(seqs), int(lengths.max())), dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, : lengths[i]] = s.prompt_ids
        state = self.runner.start(len(seqs), self.max_len)
        if seqs[0].image_embeds is not None:
            self.runner.attach_images(state, seqs[0].image_embeds)
        if seqs[0].audio_embeds is not None:
            self.runner.attach_audio(state, seqs[0].audio_embeds)
        logits = self.runner.step(state, ids, lengths)
        alive = [s.accept(logits[i, lengths[i] - 1]) for i, s in enumerate(seqs)]
        self._append(state, seqs, alive)

    def _decode(self) -> None:
        ids = np.array([[s.next_token] for s in self.rows], dtype=np.int64)
        logits = self.runner.step(self.state, ids, np.ones(len(self.rows), dtype=np.int64))
        self.steps += 1
        self.batch_sizes.append(len(self.rows))
        alive = [s.accept(logits[i, 0]) for i, s in enumerate(self.rows)]
        self._keep(alive)

    def _append(self, state: DecodeState, seqs: list[Job], alive: list[bool]) -> None:
        keep = np.flatnonzero(alive)
        if not keep.size:
            return
        # the state's own runner moves its rows (numpy or device caches): `self.runner` may wrap it
        rows = state.runner.take_rows(state, keep)
        self.state = rows if self.state is None else state.runner.join_states([self.state, rows])
        self.rows += [seqs[i] for i in keep]

    def _keep(self, alive: list[bool]) -> None:
        if all(alive):
            return
        keep = np.flatnonzero(alive)
        self.rows = [self.rows[i] for i in keep]
        self.state = self.state.runner.take_rows(self.state, keep) if self.rows else None

    def _drop_finished(self) -> None:
        """Cancelled sequences (a client went away) leave before the next step."""
        cancelled = [s.cancelled.is_set() for s in self.rows]
        if any(cancelled):
            self._keep([not c for c in cancelled])
