"""Metrics on hand-made arrays with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gemma4_compile.validate import metrics as M


def test_log_softmax_is_stable_and_normalized():
    x = np.array([[1000.0, 1000.0, -1000.0], [0.0, 0.0, 0.0]])
    ls = M.log_softmax(x)
    assert np.isfinite(ls).all()
    np.testing.assert_allclose(ls[0, :2], [-math.log(2)] * 2)
    np.testing.assert_allclose(ls[1], [-math.log(3)] * 3)


def test_abs_diffs_and_cosine():
    ref = np.array([[1.0, 2.0], [3.0, 4.0]])
    out = np.array([[1.0, 2.5], [3.0, 3.0]])
    assert M.max_abs_diff(ref, out) == 1.0
    assert M.mean_abs_diff(ref, out) == pytest.approx(0.375)
    cos = M.cosine_similarity(
        np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]), np.array([[0.0, 2.0], [2.0, 2.0], [0.0, 0.0]])
    )
    np.testing.assert_allclose(cos, [0.0, 1.0, 1.0])


def test_top1_counts_near_ties_as_agreement():
    ref = np.array([[0.0, 5.0, 4.999], [3.0, 0.0, 1.0], [0.0, 1.0, 2.0]])
    out = np.array([[0.0, 4.0, 5.0], [3.0, 0.0, 1.0], [0.0, 2.0, 1.0]])  # rows 0 and 2 pick another token
    assert M.top1_agreement(ref, out) == pytest.approx(1 / 3)
    assert M.top1_agreement(ref, out, tie_margin=0.01) == pytest.approx(2 / 3)  # row 0's gap is 0.001
    np.testing.assert_array_equal(M.top1_match(ref, out, np.array([0.0, 0.0, 1.0])), [False, True, True])


def test_topk_overlap():
    ref = np.array([[9, 8, 7, 6, 5, 0, 0, 0.0]])
    same = ref.copy()
    shifted = np.array([[9, 8, 7, 0, 0, 6, 5, 4.0]])  # top-5 {0,1,2,5,6} vs {0,1,2,3,4}
    assert M.topk_overlap(ref, same, 5) == 1.0
    assert M.topk_overlap(ref, shifted, 5) == pytest.approx(3 / 5)
    assert M.topk_overlap(ref, shifted, 1) == 1.0


def test_kl_divergence_known_value():
    p = np.log(np.array([[0.5, 0.5]]))
    q = np.log(np.array([[0.25, 0.75]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert M.kl_divergence(p, q)[0] == pytest.approx(expected)
    assert M.kl_divergence(p, p + 7.0)[0] == pytest.approx(0.0, abs=1e-15)  # shift invariant, never negative


def test_greedy_match_length_and_margin():
    assert M.greedy_match_length([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert M.greedy_match_length([1, 2], [1, 2]) == 2
    assert M.greedy_match_length([], []) == 0
    np.testing.assert_allclose(M.logit_margin(np.array([[1.0, 3.0, 2.5]]), np.array([2])), [0.5])


def test_routing_agreement_from_router_logits():
    ref = np.array([[5.0, 4.0, 0.0, 0.0], [0.0, 0.0, 3.0, 2.0]])
    same_choice = ref * 2 + 1  # softmax -> top-k: monotone, so the same experts
    one_swapped = np.array([[5.0, 0.0, 4.0, 0.0], [0.0, 0.0, 3.0, 2.0]])
    np.testing.assert_array_equal(np.sort(M.routing_topk(ref, 2), -1), [[0, 1], [2, 3]])
    assert M.routing_agreement(ref, same_choice, 2) == 1.0
    assert M.routing_agreement(ref, one_swapped, 2) == pytest.approx(0.75)


def test_overflow_scan_flags_headroom_and_nonfinite():
    scan = M.overflow_scan({"layer 0": 100.0, "layer 1": 20000.0, "layer 2": float("inf")}, headroom=4.0)
    assert scan.limit == pytest.approx(16376.0)
    assert scan.at_risk == ("layer 1", "layer 2")
    assert scan.worst == "layer 2" and not scan.ok
    assert M.overflow_scan({"layer 0": 60000.0}, headroom=1.0).ok
    hidden = np.zeros((2, 3, 4))
    hidden[1, 2, 3] = -70000.0
    np.testing.assert_array_equal(M.layer_abs_maxima(hidden), [0.0, 70000.0])


def test_first_divergent_layer_and_growth():
    ref = np.ones((4, 2, 3))
    out = ref.copy()
    out[2] += 0.5  # layer 2 goes wrong, layer 3 inherits it
    out[3] += 1.0
    errs = M.layer_relative_errors(ref, out)
    np.testing.assert_allclose(errs, [0.0, 0.0, 0.5, 1.0])
    assert M.first_divergent_layer(errs, 1e-3) == 2
    assert M.first_divergent_layer([0.0, float("nan")], 1e-3) == 1
    assert M.first_divergent_layer(errs, 2.0) is None
    growth = M.error_growth(errs)
    assert growth[0] == 1.0 and growth[3] == pytest.approx(2.0) and growth[2] > 1e6


def test_nan_activations_count_as_overflow():
    hidden = np.ones((2, 3, 4))
    hidden[0, 1, 2] = np.nan
    maxima = M.layer_abs_maxima(hidden)
    assert maxima[0] == np.inf and maxima[1] == 1.0
    assert M.overflow_scan({"layer 0": maxima[0]}).at_risk == ("layer 0",)
