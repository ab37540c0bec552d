"""validate --text FILE: perplexity of the export, the reference and (quantized) the unquantized model.

The reference is transformers' model with torch's cross-entropy on the same windows, token by token: an
independent implementation of both the model and the scoring. The text is long enough for several windows of
more than the sliding window (tiny presets: W=8).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gemma4_compile.cli import main
from gemma4_compile.validate import perplexity as P
from gemma4_compile.validate import validate

TEXT = " ".join(
    f"The {i}-th line of a small test corpus, with numbers like {i * 37 % 101}." for i in range(40)
)
WINDOW = 96  # ~12 sliding windows of the tiny presets


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _hf_nll(checkpoint, windows) -> np.ndarray:
    """Per scored token: torch cross-entropy of transformers' logits at the previous position."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    out = []
    with torch.inference_mode():
        for ids in windows:
            t = torch.from_numpy(ids)[None]
            logits = model(input_ids=t).logits[0, :-1].double()
            out.append(torch.nn.functional.cross_entropy(logits, t[0, 1:], reduction="none").numpy())
    return np.concatenate(out)


def test_onnxruntime_perplexity_matches_transformers_loss(make_export, make_checkpoint, text_file):
    from gemma4_compile.runners.ort import OrtRunner

    export = make_export("tiny-e2b")
    windows = P.text_windows(text_file, export, WINDOW)
    assert len(windows) >= 3 and all(len(w) == WINDOW for w in windows[:-1])
    runner = OrtRunner(export, threads=1)
    ours = P.negative_log_likelihoods(runner, windows)
    theirs = _hf_nll(make_checkpoint("tiny-e2b"), windows)
    assert ours.shape == theirs.shape == (sum(len(w) - 1 for w in windows),)
    assert np.abs(ours - theirs).max() < 1e-4  # fp32 logits agree to ~1e-5
    assert math.exp(ours.mean()) == pytest.approx(math.exp(theirs.mean()), rel=1e-5)
    # scoring each token from its own position instead of the previous one: the check can fail
    shifted = [np.concatenate([w[:1], w[:-1]]) for w in windows]
    assert np.abs(P.negative_log_likelihoods(runner, shifted) - theirs).max() > 1.0


def test_validate_reports_perplexity_of_a_quantized_export_and_gates_the_ratio(
    make_quant_export, text_file, monkeypatch
):
    export = make_quant_export("tiny-e2b", "int8")
    report = validate(export, steps=2, write=False, text=text_file)
    p = report.perplexity
    assert p is not None and p.format == "int8" and p.failures == [] and p.gate is None
    assert p.tokens == sum(len(w) - 1 for w in P.text_windows(text_file, export, p.window))
    assert p.backend == pytest.approx(p.reference, rel=1e-4)  # the fake-quant reference computes the same
    assert p.backend != p.unquantized and 0.5 < p.ratio < 2.0
    assert report.passed and "perplexity on corpus.txt" in report.summary().splitlines()[-1]

    # the gate's wiring, cheaply: the export as all three models (ratio 1.0) against a bound it misses
    from gemma4_compile.runners.ort import OrtRunner

    ort = OrtRunner(export, threads=1)
    windows = P.text_windows(text_file, export, 32)[:2]
    monkeypatch.setitem(P.PPL_RATIO_GATES, "int8", 0.99)
    gated = P.perplexity_report(text_file, windows, ort, ort, (ort, "int8", True))
    assert gated.ratio == 1.0 and gated.failures == ["perplexity ratio 1.0000 > 0.99"]
    assert P.perplexity_report(text_file, windows, ort, ort, (ort, "int8", False)).failures == []


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "no such file"),
        (b"\xff\xfe\x00bad", "not UTF-8 text"),
        (b"", "need at least 2 to score"),
    ],
)
def test_bad_text_files_are_one_line_errors_before_any_run(make_export, tmp_path, capfd, content, match):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_bytes(content)
    code = main(["validate", str(make_export("tiny-e2b")), "--text", str(path)])
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert code == 1 and len(err) == 1 and match in err[0], err
