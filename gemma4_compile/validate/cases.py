"""Token sequences to validate on: seeded defaults around the sliding window, or a user's JSON file.

Sliding-window bugs only show once a sequence is longer than W (docs/validation.md, prompts longer than the window), so the defaults put prompts
below, at and well past W, and a ragged batch whose rows straddle it.

Prompt file format (`--prompts FILE`): a JSON list; each element is one case, either
  * a list of token ids            -> batch 1, e.g. [2, 651, 6037, 236761]
  * a list of lists of token ids   -> one batch, rows may differ in length (right-padded internally)
e.g. `[[2, 10, 11, 12], [[2, 5, 6], [2, 7, 8, 9, 10]]]` is two cases: batch 1 and a ragged batch 2.
Ids must lie in [0, vocab_size). Tokenize with the model's own tokenizer; this tool never does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ValidateError
from ..model.config import Gemma4Spec

DEFAULT_STEPS = 16
FIRST_ID = 3  # skip pad (0), eos (1) and bos (2) in random prompts


@dataclass(frozen=True, eq=False)
class Case:
    """One batch of prompts: `input_ids` [B, S] right-padded, `lengths[b]` real tokens in row b."""

    name: str
    input_ids: np.ndarray = field(repr=False)
    lengths: np.ndarray

    @property
    def batch(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def max_len(self) -> int:
        return int(self.lengths.max())

    def describe(self) -> str:
        return f"{self.name} (batch {self.batch}, lengths {self.lengths.tolist()})"


def case_from_rows(name: str, rows: list[list[int]], pad_id: int = 0) -> Case:
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    ids = np.full((len(rows), int(lengths.max())), pad_id, dtype=np.int64)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = row
    return Case(name, ids, lengths)


def default_cases(spec: Gemma4Spec, seed: int = 0, max_len: int | None = None) -> list[Case]:
    """Prompts shorter than W, exactly W, 3W + 3 (decode then runs far past the window), and a ragged batch 2."""
    W = spec.sliding_window
    rng = np.random.default_rng(seed)

    def prompt(n: int) -> list[int]:
        ids = rng.integers(FIRST_ID, spec.vocab_size, n).tolist()
        return [spec.bos_token_id, *ids[1:]]

    plan = [
        ("short", [max(2, W // 2)]),
        ("window", [W]),
        ("long", [3 * W + 3]),
        ("ragged", [2 * W + 1, max(2, W - 1)]),
    ]
    limit = max_len or spec.max_position_embeddings
    return [
        case_from_rows(name, [prompt(min(n, limit)) for n in lens], spec.pad_token_id) for name, lens in plan
    ]


def _load_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise ValidateError(f"prompts file {path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValidateError(f"prompts file {path}: not valid JSON ({e})") from None


def _is_ids(x: object) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _rows(item: object) -> list[list[int]] | None:
    """A case element as rows of ints, or None if it has neither accepted shape."""
    if _is_ids(item):
        return [item]  # type: ignore[list-item]
    if isinstance(item, list) and item and all(_is_ids(r) for r in item):
        return item
    return None


def load_prompts(path: str | Path, spec: Gemma4Spec, max_len: int | None = None) -> list[Case]:
    """Parse a prompts file (format in the module docstring); any problem is a one-line ValidateError."""
    path = Path(path)
    data = _load_json(path)
    where = f"prompts file {path}"
    if not isinstance(data, list) or not data:
        raise ValidateError(f"{where}: expected a non-empty JSON list of token-id lists")
    limit = max_len or spec.max_position_embeddings
    cases = []
    for i, item in enumerate(data):
        rows = _rows(item)
        if rows is None:
            raise ValidateError(
                f"{where}: case {i} must be a non-empty list of token ids or a list of such lists"
            )
        for row in rows:
            bad = next((t for t in row if not 0 <= t < spec.vocab_size), None)
            if bad is not None:
                raise ValidateError(
                    f"{where}: case {i}: token {bad} is outside the vocabulary [0, {spec.vocab_size})"
                )
            if len(row) > limit:
                raise ValidateError(f"{where}: case {i}: {len(row)} tokens exceed the maximum length {limit}")
        cases.append(case_from_rows(f"prompt{i}", rows, spec.pad_token_id))
    return cases
