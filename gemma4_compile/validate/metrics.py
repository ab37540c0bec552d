"""Accuracy metrics: small pure functions on numpy arrays, no runners, no I/O.

Logit metrics take `ref` and `out` shaped [N, V] (N positions, V vocab), already restricted to real tokens
(padding removed by the caller). Layer metrics take hidden states shaped [L, N, H].
Why token-level metrics: a single atol (Polygraphy's 1e-5 default) flags healthy fp16/bf16 engines and says
nothing about what a user sees; top-1 agreement, KL and greedy-match length do (docs/validation.md, token-level metrics).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

FP16_MAX = 65504.0


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable log-softmax in float64 (shift by the max before exponentiating)."""
    x = _f64(logits)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


# ----- elementwise ------------------------------------------------------------------------------


def max_abs_diff(ref: np.ndarray, out: np.ndarray) -> float:
    if np.size(ref) == 0:
        return 0.0
    return float(np.max(np.abs(_f64(ref) - _f64(out))))


def mean_abs_diff(ref: np.ndarray, out: np.ndarray) -> float:
    if np.size(ref) == 0:
        return 0.0
    return float(np.mean(np.abs(_f64(ref) - _f64(out))))


def cosine_similarity(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity over the last axis; two zero rows count as identical (1.0)."""
    a, b = _f64(ref), _f64(out)
    dot = (a * b).sum(-1)
    norm = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    both_zero = norm == 0
    return np.where(both_zero, 1.0, dot / np.where(both_zero, 1.0, norm))


# ----- token level ------------------------------------------------------------------------------


def top1_match(ref: np.ndarray, out: np.ndarray, tie_margin: float | np.ndarray = 0.0) -> np.ndarray:
    """Per position: does the backend's argmax agree with the reference's?

    A different choice still agrees when the reference scores it within `tie_margin` of its own top logit:
    if two logits are closer than the tolerated error, either pick is correct (a near-tie, not a bug).
    """
    r = _f64(ref)
    picked = np.take_along_axis(r, np.asarray(out).argmax(-1)[:, None], -1)[:, 0]
    return picked >= r.max(-1) - tie_margin


def top1_agreement(ref: np.ndarray, out: np.ndarray, tie_margin: float | np.ndarray = 0.0) -> float:
    """Fraction of positions whose top-1 agrees (see `top1_match`)."""
    return float(np.mean(top1_match(ref, out, tie_margin))) if len(ref) else 1.0


def _topk_ids(x: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(-np.asarray(x), k - 1, axis=-1)[..., :k]


def topk_overlap_per_position(ref: np.ndarray, out: np.ndarray, k: int = 5) -> np.ndarray:
    """Per position |top-k(ref) ∩ top-k(out)| / k (1.0 = the same k candidates, order ignored)."""
    k = min(k, np.shape(ref)[-1])
    a, b = _topk_ids(ref, k), _topk_ids(out, k)
    return (a[:, :, None] == b[:, None, :]).any(-1).sum(-1) / k


def topk_overlap(ref: np.ndarray, out: np.ndarray, k: int = 5) -> float:
    """Mean top-k overlap over positions."""
    return float(np.mean(topk_overlap_per_position(ref, out, k))) if len(ref) else 1.0


def kl_divergence(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per-position KL(softmax(ref) ‖ softmax(out)) in nats, from logits; never negative."""
    lp, lq = log_softmax(ref), log_softmax(out)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0.0)


def greedy_match_length(ref_tokens: Sequence[int], out_tokens: Sequence[int]) -> int:
    """Number of leading tokens on which two greedy decodes agree."""
    n = 0
    for a, b in zip(ref_tokens, out_tokens):
        if a != b:
            break
        n += 1
    return n


def logit_margin(ref: np.ndarray, token: np.ndarray) -> np.ndarray:
    """How far below the reference's top logit each chosen token scores (0 = it is the reference's top)."""
    r = _f64(ref)
    return r.max(-1) - np.take_along_axis(r, np.asarray(token)[:, None], -1)[:, 0]


# ----- mixture of experts -----------------------------------------------------------------------


def routing_topk(router_logits: np.ndarray, top_k: int) -> np.ndarray:
    """Experts chosen per token, as the gemma4::moe op does: softmax over all experts, then top-k. [T, K]."""
    probs = np.exp(log_softmax(router_logits))
    return np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]


def routing_agreement(ref_router_logits: np.ndarray, out_router_logits: np.ndarray, top_k: int) -> float:
    """Mean fraction of the reference's top-k experts that the backend also picks, per token."""
    if len(ref_router_logits) == 0:
        return 1.0
    a, b = routing_topk(ref_router_logits, top_k), routing_topk(out_router_logits, top_k)
    return float(np.mean((a[:, :, None] == b[:, None, :]).any(-1).sum(-1) / top_k))


# ----- fp16 overflow ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OverflowScan:
    """Activation maxima against the fp16 range; `at_risk` names what exceeds FP16_MAX / headroom."""

    headroom: float
    limit: float  # FP16_MAX / headroom
    maxima: dict[str, float]
    at_risk: tuple[str, ...]
    worst: str | None
    worst_value: float

    @property
    def ok(self) -> bool:
        return not self.at_risk


def overflow_scan(maxima: dict[str, float], headroom: float = 4.0) -> OverflowScan:
    """Flag activations whose |max| exceeds 65504 / headroom (or is not finite).

    Headroom, because a reference run on a few prompts sees only part of the range real prompts reach
    (onnxruntime#32600: a residual stream at ~65k by layer 22), and fp16 sums round up near the top.
    """
    limit = FP16_MAX / headroom
    at_risk = tuple(k for k, v in maxima.items() if not np.isfinite(v) or v > limit)
    worst = max(maxima, key=lambda k: np.inf if not np.isfinite(maxima[k]) else maxima[k], default=None)
    return OverflowScan(headroom, limit, dict(maxima), at_risk, worst, float(maxima[worst]) if worst else 0.0)


def layer_abs_maxima(hidden: np.ndarray) -> np.ndarray:
    """[L, N, H] -> [L] max |activation| per layer; NaN counts as infinite (it is an overflow's symptom)."""
    h = np.abs(_f64(hidden))
    h = np.where(np.isnan(h), np.inf, h)
    return h.reshape(h.shape[0], -1).max(-1) if h.size else np.zeros(h.shape[0])


# ----- divergence localization ------------------------------------------------------------------


def layer_relative_errors(ref_hidden: np.ndarray, out_hidden: np.ndarray) -> np.ndarray:
    """[L] max|Δh| / max|h_ref| per layer: relative, because the residual stream grows with depth."""
    diff = np.abs(_f64(ref_hidden) - _f64(out_hidden)).reshape(len(ref_hidden), -1)
    scale = np.abs(_f64(ref_hidden)).reshape(len(ref_hidden), -1)
    if diff.shape[1] == 0:
        return np.zeros(len(ref_hidden))
    err = diff.max(-1) / np.maximum(scale.max(-1), 1e-30)
    return np.where(np.isfinite(err), err, np.inf)


def first_divergent_layer(layer_errors: Sequence[float], threshold: float) -> int | None:
    """Index of the first layer whose relative error exceeds `threshold` (None: all within)."""
    for i, e in enumerate(layer_errors):
        if not e <= threshold:  # also catches NaN
            return i
    return None


def error_growth(layer_errors: Sequence[float], floor: float = 1e-12) -> list[float]:
    """Per-layer ratio err[i] / err[i-1] (1.0 for layer 0, which has no predecessor): where error is born."""
    errs = [max(float(e), floor) for e in layer_errors]
    return [1.0] * bool(errs) + [b / a for a, b in pairwise(errs)]
