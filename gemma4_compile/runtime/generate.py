"""One sequence, token by token: prefill the prompt, then one-token steps until an end id or the budget."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ContextLengthExceeded, RuntimeInputError
from .sampler import GREEDY, Sampler, SamplingParams


@dataclass(frozen=True)
class GenerationResult:
    tokens: list[int]  # generated ids, without the stop id
    finish_reason: str  # "stop" (an end id) | "length" (max_new_tokens)
    prompt_tokens: int
    ttft_s: float  # prompt in -> first token chosen
    decode_s: float  # first token -> last token

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first over the time they took."""
        return (len(self.tokens) - 1) / self.decode_s if len(self.tokens) > 1 and self.decode_s > 0 else 0.0


def check_budget(prompt_tokens: int, max_new_tokens: int, max_seq_len: int) -> None:
    """The prompt and the tokens to generate must fit the export's sequence length."""
    if prompt_tokens < 1:
        raise RuntimeInputError("the prompt is empty")
    if max_new_tokens < 1:
        raise RuntimeInputError(f"max new tokens must be >= 1, got {max_new_tokens}")
    if prompt_tokens + max_new_tokens > max_seq_len:
        raise ContextLengthExceeded(
            f"{prompt_tokens} prompt tokens + {max_new_tokens} new tokens exceed the export's max_seq_len {max_seq_len}"
        )


def generate(
    runner: Any,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams = GREEDY,
    stop_ids: Sequence[int] = (),
    on_token: Callable[[int], None] | None = None,
    max_seq_len: int | None = None,
    image_embeds: np.ndarray | None = None,
    audio_embeds: np.ndarray | None = None,
    prefill_chunk: int | None = None,
) -> GenerationResult:
    """Generate up to `max_new_tokens` after `prompt_ids`; `on_token` sees each id as it is chosen.
    `image_embeds` / `audio_embeds`: the soft tokens of the prompt's image / audio placeholders
    (runtime/images.py). `prefill_chunk`: prompt tokens per call (bounds the prefill's logits and
    activations); a prompt with images or audio is prefilled in one call, so no media run is split."""
    limit = max_seq_len or runner.manifest.max_seq_len
    check_budget(len(prompt_ids), max_new_tokens, limit)
    sampler, stops = Sampler(params), set(stop_ids)
    t0 = time.perf_counter()
    state = runner.start(1, len(prompt_ids) + max_new_tokens)
    if image_embeds is not None:
        runner.attach_images(state, image_embeds)
    if audio_embeds is not None:
        runner.attach_audio(state, audio_embeds)
    ids = np.asarray([prompt_ids], dtype=np.int64)
    media = image_embeds is not None or audio_embeds is not None
    chunk = ids.shape[1] if media or not prefill_chunk else prefill_chunk
    for start in range(0, ids.shape[1], chunk):
        part = ids[:, start : start + chunk]
        logits = runner.step(state, part, np.array([part.shape[1]], dtype=np.int64))[0, -1]
    tokens: list[int] = []
    t_first = None
    finish = "length"
    for _ in range(max_new_tokens):
        token = sampler(logits)
        t_first = t_first or time.perf_counter()
        if token in stops:
            finish = "stop"
            break
        tokens.append(token)
        if on_token:
            on_token(token)
        if len(tokens) == max_new_tokens:
            break
        logits = runner.step(state, np.array([[token]], dtype=np.int64), np.ones(1, dtype=np.int64))[0, -1]
    t_end = time.perf_counter()
    return GenerationResult(
        tokens, finish, len(prompt_ids), (t_first or t_end) - t0, t_end - (t_first or t_end)
    )
