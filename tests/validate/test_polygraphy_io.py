"""Polygraphy files: loadable by Polygraphy itself, named as the decoder's I/O, and `polygraphy run` agrees."""

from __future__ import annotations

import shlex
import shutil
import subprocess

import numpy as np
import pytest

from gemma4_compile.export.io_spec import decoder_io
from gemma4_compile.validate import default_cases
from gemma4_compile.validate.polygraphy_io import save_decoder_reference

polygraphy = pytest.importorskip("polygraphy")
from polygraphy.comparator import RunResults  # noqa: E402
from polygraphy.json import load_json  # noqa: E402


def test_files_load_with_polygraphy_and_match_the_decoder_io(tmp_path, torch_runner):
    ref = torch_runner("tiny-e2b")
    case = default_cases(ref.spec)[3]  # ragged batch 2
    files = save_decoder_reference(ref, tmp_path / "no-export", tmp_path, case, "fp32")
    feeds = load_json(files.inputs)
    results = RunResults.load(files.outputs)
    inputs, outputs = decoder_io(ref.spec, "fp32")
    assert len(feeds) == files.iterations == 2
    assert [set(f) for f in feeds] == [{t.name for t in inputs}] * 2
    ((runner, iterations),) = results.items()
    assert runner == "torch_reference" and len(iterations) == 2
    assert set(iterations[0].keys()) == {t.name for t in outputs}
    prefill, decode = feeds
    assert prefill["inputs_embeds"].shape[:2] == case.input_ids.shape
    np.testing.assert_array_equal(prefill["seq_len"], case.lengths)
    np.testing.assert_array_equal(decode["past_len"], case.lengths)  # the decode step continues each row
    assert decode["inputs_embeds"].shape[1] == 1
    np.testing.assert_array_equal(decode["past_key_values.0.key"], iterations[0]["present.0.key"])
    logits = ref.logits(case.input_ids, case.lengths)
    for b, n in enumerate(case.lengths):
        np.testing.assert_allclose(iterations[0]["logits"][b, :n], logits[b, :n], atol=1e-5)
    assert "--load-inputs" in files.command and "--atol 0.001" in files.command


def _polygraphy_run(command: str) -> subprocess.CompletedProcess:
    exe = shutil.which("polygraphy")
    if exe is None:
        pytest.skip("polygraphy CLI not on PATH")
    args = shlex.split(command)
    return subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=300)


def test_polygraphy_run_reproduces_the_comparison(tmp_path, make_export, torch_runner, make_checkpoint):
    from gemma4_compile.model.weights import load_model
    from gemma4_compile.validate import TorchRunner

    export = make_export("tiny-31b")
    ref = torch_runner("tiny-31b")
    case = max(default_cases(ref.spec), key=lambda c: c.max_len)
    good = save_decoder_reference(ref, export, tmp_path / "good", case, "fp32")
    run = _polygraphy_run(good.command)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "PASSED" in run.stdout + run.stderr

    model = load_model(make_checkpoint("tiny-31b"))
    model.layers[1].mlp.gate_proj.weight.data *= 1.05  # a reference that disagrees must make Polygraphy fail
    bad = save_decoder_reference(
        TorchRunner(make_checkpoint("tiny-31b"), model=model), export, tmp_path / "bad", case, "fp32"
    )
    run = _polygraphy_run(bad.command)
    assert run.returncode != 0 and "FAILED" in run.stdout + run.stderr
