"""validate() and bench() on a real export: the one-call API the CLI uses."""

from __future__ import annotations

import importlib
import json
import shutil

import pytest

from gemma4_compile.errors import Gemma4CompileError
from gemma4_compile.validate import BenchConfig, bench, validate


def test_validate_ort_export_writes_reports(tmp_path, make_export, make_checkpoint):
    export = make_export("tiny-31b")
    report = validate(
        export, backend="ort", checkpoint=make_checkpoint("tiny-31b"), steps=6, out_dir=tmp_path
    )
    assert report.passed, report.failure_message()
    assert report.backend == "ort" and report.precision == "fp32" and report.export_dir == str(export)
    assert max(c.max_abs for c in report.cases) < 1e-3
    folder = tmp_path / "reports"
    for name in (
        "accuracy.json",
        "accuracy.md",
        "summary.md",
        "polygraphy_inputs.json",
        "polygraphy_ref.json",
    ):
        assert (folder / name).is_file(), name
    assert "polygraphy run" in (folder / "accuracy.md").read_text()
    assert json.loads((folder / "accuracy.json").read_text())["polygraphy"]["iterations"] == 2


def test_validate_with_a_prompt_file(tmp_path, make_export, make_checkpoint):
    prompts = tmp_path / "p.json"
    prompts.write_text(
        json.dumps([[2, 17, 33, 99, 100, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]])
    )
    report = validate(
        make_export("tiny-31b"), checkpoint=make_checkpoint("tiny-31b"), prompts=prompts, steps=3, write=False
    )
    assert [c.name for c in report.cases] == ["prompt0"] and report.passed


def test_validate_user_errors(tmp_path, make_export):
    with pytest.raises(Gemma4CompileError, match="not an export directory"):
        validate(tmp_path)
    with pytest.raises(Gemma4CompileError, match="unknown reference 'jax'"):
        validate(make_export("tiny-31b"), reference="jax")
    export = shutil.copytree(make_export("tiny-31b"), tmp_path / "export")
    manifest = json.loads((export / "export.json").read_text())
    manifest.pop("checkpoint")  # an export that names no checkpoint
    (export / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(Gemma4CompileError, match="needs the source checkpoint"):
        validate(export, write=False)


def test_validate_finds_the_recorded_checkpoint(make_export):
    export = make_export("tiny-31b")
    assert json.loads((export / "export.json").read_text()).get("checkpoint")
    report = validate(export, steps=2, write=False)
    assert report.passed, report.failure_message()


def test_bench_export(tmp_path, make_export, make_checkpoint):
    config = BenchConfig(context_lengths=(8, 32), batch_sizes=(1,), decode_steps=3, prefill_repeats=1)
    report = bench(
        make_export("tiny-31b"),
        backends=["ort"],
        checkpoint=make_checkpoint("tiny-31b"),
        config=config,
        out_dir=tmp_path,
    )
    assert {r.backend for r in report.rows} == {"torch", "hf", "ort"}
    assert all(r.vs_torch is not None for r in report.rows)
    assert (tmp_path / "reports" / "latency.md").is_file() and (tmp_path / "reports" / "summary.md").is_file()
    # host memory per backend from a process of its own: ORT's peak no longer carries torch + transformers
    memory = {s.backend: s for s in report.backends}
    assert all(s.peak_rss_mb and s.base_rss_mb < s.peak_rss_mb for s in memory.values()), memory
    assert all("own process, batch 1, 32-token prompt" in s.memory_note for s in memory.values())
    assert memory["ort"].peak_rss_mb < 0.8 * memory["torch"].peak_rss_mb, memory
    assert "peak RSS" in (tmp_path / "reports" / "summary.md").read_text()
    # which of our own CPU kernels the ort runner used is part of its numbers (a dense fp32 export: attention),
    # or why none ran where the library is not built
    kernels = memory["ort"].kernels
    assert kernels == "attention" or kernels.startswith("unavailable:"), kernels
    assert memory["torch"].kernels is None
    assert f"CPU kernels: {kernels}" in (tmp_path / "reports" / "latency.md").read_text()
    assert memory["ort"].huge_pages and memory["torch"].huge_pages is None  # how much, or why not


def test_hf_reference_keeps_the_torch_reports_and_stale_polygraphy_files_go(
    tmp_path, make_export, make_checkpoint, monkeypatch
):
    from gemma4_compile.errors import BackendUnavailable
    from gemma4_compile.validate import polygraphy_io

    export, ckpt = make_export("tiny-31b"), make_checkpoint("tiny-31b")
    validate(export, checkpoint=ckpt, steps=2, out_dir=tmp_path)
    validate(export, reference="hf", checkpoint=ckpt, steps=2, out_dir=tmp_path)
    folder = tmp_path / "reports"
    assert json.loads((folder / "accuracy.json").read_text())["reference"] == "torch"
    assert json.loads((folder / "accuracy-hf.json").read_text())["reference"] == "hf"
    assert (folder / "polygraphy_ref.json").is_file()  # the torch run's files, still valid

    def unavailable(*args, **kwargs):
        raise BackendUnavailable("polygraphy: not installed")

    monkeypatch.setattr(polygraphy_io, "save_decoder_reference", unavailable)
    report = validate(export, checkpoint=ckpt, steps=2, out_dir=tmp_path)
    assert not (folder / "polygraphy_ref.json").exists() and not (folder / "polygraphy_inputs.json").exists()
    assert any("polygraphy files not written" in w for w in report.warnings)


def test_bench_fails_on_a_missing_backend_before_timing_cpu_baselines(
    make_export, make_checkpoint, monkeypatch
):
    bench_module = importlib.import_module("gemma4_compile.validate.bench")

    def never(*args, **kwargs):
        raise AssertionError("a CPU baseline was timed before the requested backend was checked")

    monkeypatch.setattr(bench_module, "time_runner", never)
    from gemma4_compile.errors import BackendUnavailable

    validate_module = importlib.import_module(
        "gemma4_compile.validate.validate"
    )  # the module, not the function

    def make(name, *args, **kwargs):
        if name == "trt":
            raise BackendUnavailable("trt: no CUDA GPU")
        return object()

    monkeypatch.setattr(validate_module, "make_runner", make)
    with pytest.raises(Gemma4CompileError, match="trt: no CUDA GPU"):
        bench(make_export("tiny-31b"), backends=["trt"], checkpoint=make_checkpoint("tiny-31b"), write=False)


def test_the_hf_reference_loads_and_runs_without_deprecation_warnings(make_checkpoint):
    """`validate --reference hf` must not print transformers' deprecation notices (their cause is fixed, not
    filtered: this catches every warning, whatever the CLI's filters)."""
    import warnings

    import numpy as np

    from gemma4_compile.validate import HFRunner

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = HFRunner(make_checkpoint("tiny-31b"))
        state = runner.start(1, 24)
        runner.step(state, np.arange(3, 23, dtype=np.int64)[None], np.array([20]))
        runner.step(state, np.array([[5]]), np.array([1]))
    deprecations = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not deprecations, [f"{w.filename}:{w.lineno}: {w.message}" for w in deprecations]
