"""Next-token choice from one row of logits: greedy, or temperature -> top-k -> top-p sampling (numpy).

The filters follow transformers' logits processors in the same order: divide by the temperature, keep the
k largest, then keep the smallest set of most likely tokens whose probability reaches top_p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import Gemma4CompileError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 (or None) is greedy; top_k 0 / top_p 1 switch a filter off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise Gemma4CompileError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise Gemma4CompileError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise Gemma4CompileError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


def filtered_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution sampling draws from: [V] probabilities, zero outside the top-k / top-p sets."""
    scaled = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < scaled.size:
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]  # mass of the more likely tokens
        keep = np.zeros(probs.size, dtype=bool)
        keep[order[before < params.top_p]] = True  # the most likely token always stays
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum()
    return probs


class Sampler:
    """One sequence's sampler: its own generator, so a seed reproduces the sequence whatever else runs."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.params.greedy:
            return int(np.argmax(logits))
        probs = filtered_probs(logits, self.params)
        return int(self.rng.choice(probs.size, p=probs))
