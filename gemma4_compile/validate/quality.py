"""Quantization quality: a quantized export against the *unquantized* model, reported always, gated on request.

Correctness is the fake-quant gate (validate.py: the export must compute what the dequantized weights compute).
Quality is how far rounding moved the model: KL, top-1/top-5 and greedy agreement of the backend's logits with
the float model's, on the same prompts with the reference's greedy tokens fed to both. On random weights these
numbers describe random logits, not a language model: gate on them (`validate --quality-gate`) only for real
checkpoints. The thresholds (QUALITY_GATES, docs/export-format.md "Quantization quality") are loose bounds
from the peers' published int8/fp8/int4 results, meant to catch a broken recipe, not to rank methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from . import metrics as M


@dataclass(frozen=True)
class QualityGate:
    kl_mean: float  # nats, mean over positions
    top1: float  # fraction of positions whose argmax equals the float model's


QUALITY_GATES = {
    "int8": QualityGate(kl_mean=0.01, top1=0.95),
    "fp8": QualityGate(kl_mean=0.02, top1=0.93),
    "int4": QualityGate(kl_mean=0.1, top1=0.85),
    "nvfp4": QualityGate(kl_mean=0.1, top1=0.85),
}


@dataclass(frozen=True)
class CaseQuality:
    kl_mean: float
    kl_max: float
    top1: float
    top5: float
    greedy_match: list[int]  # per row: leading decode steps whose argmax equals the float model's


def case_quality(
    unquantized_rows: list[np.ndarray], backend_rows: list[np.ndarray], steps: int
) -> CaseQuality:
    """Per case: both runs forced along the same tokens, row by row (rows hold prefill + decode positions)."""
    kl, top1, top5, greedy = [], [], [], []
    for f, b in zip(unquantized_rows, backend_rows):
        kl.append(M.kl_divergence(f, b))
        top1.append(M.top1_match(f, b))
        top5.append(M.topk_overlap_per_position(f, b, 5))
        decode = slice(len(f) - steps, len(f))  # the last prefill position, then every decode step
        greedy.append(M.greedy_match_length(f[decode].argmax(-1).tolist(), b[decode].argmax(-1).tolist()))
    kl_all = np.concatenate(kl)
    return CaseQuality(
        kl_mean=float(kl_all.mean()),
        kl_max=float(kl_all.max()),
        top1=float(np.concatenate(top1).mean()),
        top5=float(np.concatenate(top5).mean()),
        greedy_match=greedy,
    )


@dataclass(frozen=True)
class QualityReport:
    format: str  # the export's --quant
    kl_mean: float  # over cases (each case's mean weighs the same)
    kl_max: float
    top1: float
    top5: float
    greedy_min: int  # the shortest agreeing greedy run of any row
    steps: int
    gated: bool
    gate: QualityGate | None
    failures: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (
            f"{self.format} vs the unquantized model: KL mean {self.kl_mean:.3g} (max {self.kl_max:.3g}), "
            f"top-1 {self.top1:.1%}, top-5 {self.top5:.1%}, greedy ≥ {self.greedy_min}/{self.steps}"
        )


def quality_report(fmt: str, cases: list[CaseQuality], steps: int, gated: bool) -> QualityReport:
    """Aggregate; with `gated`, failures name each threshold the export misses."""
    gate = QUALITY_GATES.get(fmt)
    report = QualityReport(
        format=fmt,
        kl_mean=float(np.mean([c.kl_mean for c in cases])),
        kl_max=max(c.kl_max for c in cases),
        top1=float(np.mean([c.top1 for c in cases])),
        top5=float(np.mean([c.top5 for c in cases])),
        greedy_min=min(m for c in cases for m in c.greedy_match),
        steps=steps,
        gated=gated,
        gate=gate,
    )
    if not gated or gate is None:
        return report
    failures = []
    if report.kl_mean > gate.kl_mean:
        failures.append(f"KL mean {report.kl_mean:.3g} > {gate.kl_mean:g}")
    if report.top1 < gate.top1:
        failures.append(f"top-1 {report.top1:.1%} < {gate.top1:.0%}")
    return replace(report, failures=failures)
