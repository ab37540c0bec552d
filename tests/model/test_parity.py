"""Our reference model against transformers' Gemma4 (eager attention, eager experts), fp32 and bf16.

Norm weights, layer_scalar and router scales are randomized away from 1 (model/checkpoint.py), prompts are
at least 3 windows long, and a wrong window (W±1) demonstrably fails the same check.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gemma4_compile.model.presets import PRESETS
from gemma4_compile.model.weights import load_model
from gemma4_compile.validate.reference import HFRunner, TorchRunner

FP32_ATOL = 1e-4  # the bound on max |Δlogit|; observed ~1e-5


def prompt(spec, length: int, seed: int = 0, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, spec.vocab_size, (batch, length))


def assert_logits_match(ours: np.ndarray, ref: np.ndarray, atol: float = FP32_ATOL) -> None:
    diff = np.abs(ours - ref)
    worst = np.unravel_index(diff.argmax(), diff.shape)
    assert diff.max() <= atol, f"max |Δlogit| {diff.max():.3g} at {worst} exceeds {atol}"


@pytest.fixture(scope="module")
def runners(make_checkpoint):
    cache = {}

    def get(preset):
        if preset not in cache:
            path = make_checkpoint(preset)
            cache[preset] = TorchRunner(path), HFRunner(path)
        return cache[preset]

    return get


def test_prefill_logits_match_over_three_windows(runners, tiny_preset):
    ours, hf = runners(tiny_preset)
    ids = prompt(ours.spec, 3 * ours.spec.sliding_window + 5)
    assert_logits_match(ours.logits(ids), hf.logits(ids))


def test_cached_decode_equals_full_forward_at_every_step(runners, tiny_preset):
    """Prefill, then 2W+2 one-token steps through the ring caches; each step's logits vs one uncached pass."""
    ours, hf = runners(tiny_preset)
    W = ours.spec.sliding_window
    ids = prompt(ours.spec, W - 3, seed=1)
    tokens, step_logits = ours.generate_with_logits(ids, 2 * W + 2)
    full = hf.full_logits(np.concatenate([ids, tokens[:, :-1]], axis=1))
    assert_logits_match(step_logits, full[:, ids.shape[1] - 1 :])


def test_greedy_tokens_identical_over_32_steps(runners, tiny_preset):
    ours, hf = runners(tiny_preset)
    ids = prompt(ours.spec, ours.spec.sliding_window + 3, seed=2)
    np.testing.assert_array_equal(ours.generate(ids, 32), hf.generate(ids, 32))


def test_batch_of_two_with_different_lengths(runners, tiny_preset):
    ours, hf = runners(tiny_preset)
    W = ours.spec.sliding_window
    ids = prompt(ours.spec, 3 * W + 2, seed=3, batch=2)
    lengths = np.array([3 * W + 2, W + 1])
    a, b = ours.logits(ids, lengths), hf.logits(ids, lengths)
    for row, n in enumerate(lengths):
        assert_logits_match(a[row, :n], b[row, :n])
    np.testing.assert_array_equal(ours.generate(ids, 12, lengths), hf.generate(ids, 12, lengths))


@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_window_fails_the_parity_check(runners, make_checkpoint, delta):
    """The check above is not vacuous: the same weights with window W±1 are caught."""
    _, hf = runners("tiny-e2b")
    spec = PRESETS["tiny-e2b"]
    bad = load_model(
        make_checkpoint("tiny-e2b"),
        spec=dataclasses.replace(spec, sliding_window=spec.sliding_window + delta),
    )
    ids = prompt(spec, 3 * spec.sliding_window + 5)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_logits_match(TorchRunner(None, model=bad).logits(ids), hf.logits(ids))


def test_dropped_layer_scalar_fails_the_parity_check(runners, make_checkpoint):
    ours, hf = runners("tiny-31b")
    model = load_model(make_checkpoint("tiny-31b"))
    for layer in model.layers:
        layer.layer_scalar.fill_(1.0)
    ids = prompt(ours.spec, 40)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_logits_match(TorchRunner(None, model=model).logits(ids), hf.logits(ids))


# bf16: ours and transformers run the same math in bf16 with fp32 norms/softmax; our logits are produced
# in fp32 from the bf16 head (transformers soft-caps in bf16), so expect bf16-rounding-sized differences.
BF16_MAX_ABS = 0.25  # logits are O(5); bf16 has ~3 significant digits
BF16_TOP1 = 0.95


def test_bf16_is_finite_and_close(make_checkpoint, tiny_preset):
    path = make_checkpoint(tiny_preset, torch.bfloat16)
    ours, hf = TorchRunner(path, dtype="bf16"), HFRunner(path, dtype="bf16")
    ids = prompt(ours.spec, 3 * ours.spec.sliding_window + 5, seed=4)
    a, b = ours.logits(ids), hf.logits(ids)
    assert np.isfinite(a).all()
    assert np.abs(a - b).max() <= BF16_MAX_ABS, np.abs(a - b).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= BF16_TOP1
