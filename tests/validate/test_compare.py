"""compare_runners: transformers agrees with our model; planted bugs fail with a message that says where."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gemma4_compile.errors import ValidationFailed
from gemma4_compile.model.weights import load_model
from gemma4_compile.validate import HFRunner, TorchRunner, compare_runners, default_cases
from gemma4_compile.validate.cases import case_from_rows
from gemma4_compile.validate.validate import EXACT, TOLERANCES, run_case

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize(
    ("preset", "precision"), [("tiny-e2b", "fp32"), ("tiny-26b-a4b", "fp32"), ("tiny-31b", "bf16")]
)
def test_transformers_matches_our_model(make_checkpoint, torch_runner, preset, precision):
    ref = torch_runner(preset, precision)
    report = compare_runners(
        HFRunner(make_checkpoint(preset), precision), ref, default_cases(ref.spec), precision=precision
    )
    assert report.passed, report.failure_message()
    report.raise_if_failed()
    for c in report.cases:
        assert c.greedy_match == [report.steps] * c.batch
        assert c.top1 == 1.0
        assert c.max_abs_past_window is not None and c.positions > 0
        if precision == "fp32":
            assert c.max_abs < 1e-4
    if ref.spec.enable_moe_block:
        assert all(c.routing == 1.0 for c in report.cases)
    assert report.overflow is not None and report.overflow.ok
    assert "matches" in report.summary()


def _broken(ckpt, precision, spec=None, edit=None):
    model = load_model(ckpt, DTYPES[precision], spec=spec)
    if edit:
        edit(model)
    return TorchRunner(ckpt, precision, model=model)


def _validate_broken(make_checkpoint, torch_runner, preset, precision="fp32", exact=True, **kw):
    """The planted bug against the reference, judged by the drift gate (the reference one precision up)."""
    ref = torch_runner(preset, precision)
    backend = _broken(make_checkpoint(preset), precision, **kw)
    up = torch_runner(preset, EXACT[precision]) if exact else None
    return compare_runners(backend, ref, default_cases(ref.spec), precision=precision, exact=up), ref.spec


def test_scaled_weight_fails_and_is_localized(make_checkpoint, torch_runner):
    def scale(model):  # gate_proj: a scale on o_proj/down_proj would be erased by the post-norms
        model.layers[3].mlp.gate_proj.weight.data *= 1.05

    report, _ = _validate_broken(make_checkpoint, torch_runner, "tiny-e2b", edit=scale)
    assert not report.passed
    assert all(not c.passed for c in report.cases)
    long = next(c for c in report.cases if c.name == "long")
    assert long.localization.first_layer == 3 and long.localization.first_kind == "sliding"
    assert (
        long.localization.layer_errors[2] < TOLERANCES["fp32"].layer_rel < long.localization.layer_errors[3]
    )
    with pytest.raises(
        ValidationFailed,
        match=r"max \|Δlogit\| to fp64 .* > 0.0001 \(= max\(0.0001, 4 x the reference's own .*"
        r"first divergent layer 3 \(sliding\)",
    ):
        report.raise_if_failed()


def test_window_off_by_one_fails_only_past_the_window(make_checkpoint, torch_runner):
    spec = torch_runner("tiny-e2b").spec
    W = spec.sliding_window
    report, _ = _validate_broken(
        make_checkpoint, torch_runner, "tiny-e2b", spec=dataclasses.replace(spec, sliding_window=W + 1)
    )
    assert not report.passed
    for c in report.cases:
        assert c.max_abs_in_window < 1e-5 < 1e-3 < c.max_abs_past_window, c.name  # nothing differs before W
        assert c.worst_position >= W
    long = next(c for c in report.cases if c.name == "long")
    assert long.localization.first_layer == 0 and long.localization.first_kind == "sliding"
    short = next(c for c in report.cases if c.name == "short")  # prompt < W: only its decode steps pass W
    assert "no layer diverges on the prompt" in short.message() and "decode / cache path" in short.message()
    assert "past the window W=8" in long.message()


def test_window_off_by_one_fails_in_bf16_too(make_checkpoint, torch_runner):
    spec = torch_runner("tiny-31b", "bf16").spec
    bad = dataclasses.replace(spec, sliding_window=spec.sliding_window + 1)
    report, _ = _validate_broken(make_checkpoint, torch_runner, "tiny-31b", "bf16", spec=bad)
    assert not report.passed
    assert "past the window" in report.failure_message()


def test_dropped_layer_scalar_fails_at_layer_0(make_checkpoint, torch_runner):
    def drop(model):
        for layer in model.layers:
            layer.layer_scalar.fill_(1.0)

    report, _ = _validate_broken(make_checkpoint, torch_runner, "tiny-e2b", edit=drop)
    assert all(not c.passed for c in report.cases)
    for c in report.cases:
        assert c.top1 < 0.9 and c.kl_mean > 1e-2
        assert c.localization.first_layer == 0
        assert c.greedy_match[0] < c.steps
    msg = report.failure_message()
    assert msg.startswith("torch disagrees with torch (fp32) in 4/4 cases: short")
    assert "greedy decode of row 0 parts from the reference at step" in msg and "(and 3 more" in msg


def test_half_precision_table_admits_an_fp32_backend(make_checkpoint, torch_runner):
    """The widest legitimate gap: a backend computing in fp32 against the bf16 reference still passes."""
    ref = torch_runner("tiny-e2b", "bf16")
    report = compare_runners(torch_runner("tiny-e2b"), ref, default_cases(ref.spec), precision="bf16")
    assert report.passed, report.failure_message()
    assert report.cases[0].max_abs > 1e-3  # an fp32-style atol would have failed it


def test_nan_backend_fails(make_checkpoint, torch_runner):
    def poison(model):
        model.layers[5].post_attention_layernorm.weight.data[0] = float("nan")

    report, _ = _validate_broken(make_checkpoint, torch_runner, "tiny-31b", edit=poison)
    assert not report.passed
    assert "non-finite backend logits" in report.failure_message()


def test_teacher_forcing_feeds_the_reference_tokens(torch_runner):
    ref = torch_runner("tiny-31b")
    case = case_from_rows("r", [[2, 5, 6, 7], [2, 9]])
    free = run_case(ref, case, steps=5)
    forced = run_case(ref, case, steps=5, feed=free.choices)
    np.testing.assert_array_equal(free.choices, forced.choices)
    assert [len(r) for r in free.rows] == [4 + 4, 2 + 4]
    tokens = ref.generate(case.input_ids, 5, case.lengths)
    np.testing.assert_array_equal(tokens, free.choices)
