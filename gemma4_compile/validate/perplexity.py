"""Perplexity on a text file the user supplies (`validate --text FILE`).

Every export gets the backend's and the reference's perplexity over the same tokens (their agreement is one more
correctness check); a quantized export also gets the unquantized model's, the quality number peers publish
(llama.cpp's `perplexity`, AutoAWQ's wikitext runs). On random weights the values sit near the vocabulary size
and say nothing about quality; the ratio quantized / unquantized is gated only with `--quality-gate`.

Scoring: the file is tokenized once with the export's tokenizer (BOS first), cut into non-overlapping windows
of `window` tokens, and each token after the first of its window is scored from its prefix inside the window:
ppl = exp(mean NLL). A window's first tokens see little context, so numbers compare only at the same window,
which the report records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import ValidateError
from ..runners.base import BaseRunner

DEFAULT_WINDOW = 512
# Loose bounds on perplexity(quantized) / perplexity(unquantized) for real checkpoints, from the peers' published
# Gemma/Llama results (llama.cpp Q8_0 ~+0.1 %, FP8 ~+0.5 %, Q4_0 and NVFP4 +3-8 %): they catch a broken recipe.
PPL_RATIO_GATES = {"int8": 1.01, "fp8": 1.02, "int4": 1.10, "nvfp4": 1.10}


@dataclass(frozen=True)
class PerplexityReport:
    file: str
    window: int
    windows: int
    tokens: int  # scored: every token of each window but its first
    backend: float
    reference: float
    unquantized: float | None = None  # quantized exports: the float model on the same tokens
    format: str | None = None
    gate: float | None = None  # the ratio bound when gated
    failures: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        return None if self.unquantized is None else self.backend / self.unquantized

    def describe(self) -> str:
        line = (
            f"perplexity on {Path(self.file).name} ({self.tokens} tokens, windows of {self.window}): "
            f"backend {self.backend:.6g}, reference {self.reference:.6g}"
        )
        if self.unquantized is not None:
            line += f", unquantized {self.unquantized:.6g} (ratio {self.ratio:.4f})"
        return line


def text_windows(path: str | Path, export_dir: str | Path, window: int) -> list[np.ndarray]:
    """The file's token ids in windows of `window` (the last one shorter); one-line errors for bad files."""
    from ..runtime.errors import RuntimeInputError
    from ..runtime.tokenizer import TextTokenizer

    path = Path(path)
    if not path.is_file():
        raise ValidateError(f"--text {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValidateError(f"--text {path}: not UTF-8 text (byte {e.start})") from None
    try:
        ids = np.asarray(TextTokenizer(export_dir).encode(text), dtype=np.int64)
    except RuntimeInputError as e:
        raise ValidateError(f"--text needs the export's tokenizer: {e}") from None
    if window < 2:
        raise ValidateError(f"the perplexity window must hold at least 2 tokens, got {window}")
    chunks = [ids[i : i + window] for i in range(0, len(ids), window)]
    chunks = [c for c in chunks if len(c) >= 2]  # a 1-token tail has nothing to score
    if not chunks:
        raise ValidateError(f"--text {path}: {len(ids)} token(s), need at least 2 to score")
    return chunks


def negative_log_likelihoods(runner: BaseRunner, windows: list[np.ndarray]) -> np.ndarray:
    """NLL (nats, float64) of every token after the first of each window, given its prefix in the window."""
    out = []
    for ids in windows:
        logits = runner.logits(ids[None]).astype(np.float64)[0, :-1]  # position i predicts token i + 1
        peak = logits.max(-1)
        lse = peak + np.log(np.exp(logits - peak[:, None]).sum(-1))
        out.append(lse - logits[np.arange(len(ids) - 1), ids[1:]])
    return np.concatenate(out)


def _ppl(runner: BaseRunner, windows: list[np.ndarray]) -> float:
    return math.exp(float(negative_log_likelihoods(runner, windows).mean()))


def perplexity_report(
    path: str | Path,
    windows: list[np.ndarray],
    backend: BaseRunner,
    reference: BaseRunner,
    unquantized: tuple[BaseRunner, str, bool] | None = None,
) -> PerplexityReport:
    """Backend, reference and (quantized exports) unquantized perplexity over `text_windows`; with the gate
    flag, failures name a ratio over PPL_RATIO_GATES."""
    report = PerplexityReport(
        file=str(path),
        window=max(len(w) for w in windows),
        windows=len(windows),
        tokens=sum(len(w) - 1 for w in windows),
        backend=_ppl(backend, windows),
        reference=_ppl(reference, windows),
    )
    if unquantized is None:
        return report
    model, fmt, gated = unquantized
    report = replace(report, unquantized=_ppl(model, windows), format=fmt)
    gate = PPL_RATIO_GATES.get(fmt)
    if not gated or gate is None:
        return report
    failures = [f"perplexity ratio {report.ratio:.4f} > {gate:g}"] if report.ratio > gate else []
    return replace(report, gate=gate, failures=failures)
