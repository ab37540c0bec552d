"""Run an export: tokenizer and chat template, sampling, generation, and an OpenAI-compatible server.

Nothing here imports torch or transformers; the runner comes from `backend.open_runner` (the one import site).
"""

from __future__ import annotations

from .backend import open_runner
from .errors import RuntimeInputError
from .generate import GenerationResult, check_budget, generate
from .sampler import Sampler, SamplingParams, filtered_probs
from .tokenizer import GenerationDefaults, TextTokenizer, load_tokenizer

__all__ = [
    "GenerationDefaults",
    "GenerationResult",
    "RuntimeInputError",
    "Sampler",
    "SamplingParams",
    "TextTokenizer",
    "check_budget",
    "filtered_probs",
    "generate",
    "load_tokenizer",
    "open_runner",
]
