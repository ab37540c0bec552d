"""Reports are written atomically from the dataclasses and are well-formed; benchmarks produce rows."""

from __future__ import annotations

import dataclasses
import json

import pytest

from gemma4_compile.errors import BackendUnavailable
from gemma4_compile.validate import (
    BenchConfig,
    HFRunner,
    bench_runners,
    compare_runners,
    default_cases,
    write_reports,
)
from gemma4_compile.validate.report import summary_markdown

SMALL = BenchConfig(context_lengths=(4, 12), batch_sizes=(1, 2), decode_steps=3, prefill_repeats=2)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reports(make_checkpoint, torch_runner):
    ref = torch_runner("tiny-31b")
    ckpt = make_checkpoint("tiny-31b")
    accuracy = compare_runners(HFRunner(ckpt), ref, default_cases(ref.spec)[:2], steps=4)

    def unavailable():
        raise BackendUnavailable("trt: no GPU here")

    latency = bench_runners({"torch": ref, "hf": lambda: HFRunner(ckpt), "trt": unavailable}, ref.spec, SMALL)
    return accuracy, latency


def test_bench_rows(reports):
    _, latency = reports
    ok = [s for s in latency.backends if not s.error]
    assert [s.backend for s in ok] == ["torch", "hf"]
    assert next(s for s in latency.backends if s.backend == "trt").error == "trt: no GPU here"
    assert ok[0].load_s is None and ok[1].load_s > 0  # a prebuilt runner has no load time
    assert len(latency.rows) == 2 * 2 * 2 * 2  # backends x phases x batches x contexts
    for r in latency.rows:
        assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms and r.tokens_per_s > 0
        assert r.samples == (SMALL.decode_steps if r.phase == "decode" else SMALL.prefill_repeats)
        assert r.vs_torch == pytest.approx(1.0) if r.backend == "torch" else r.vs_torch > 0
    assert set(latency.ttft_ms("hf")) == {4, 12}
    assert latency.row("hf", "decode", 2, 12).batch == 2
    assert "torch: TTFT" in latency.summary() and "trt: not run" in latency.summary()


def test_write_reports(tmp_path, reports):
    accuracy, latency = reports
    written = write_reports(tmp_path, accuracy=accuracy, latency=latency)
    folder = tmp_path / "reports"
    names = {p.name for p in written}
    assert names == {
        "accuracy.json",
        "accuracy.md",
        "accuracy_error_by_position.png",
        "latency.json",
        "latency.md",
        "latency_decode.png",
        "summary.md",
    }
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # no temporary files left behind
    acc = json.loads((folder / "accuracy.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert acc["passed"] is True and acc["tolerance"]["precision"] == "fp32"
    assert len(acc["cases"]) == 2 and acc["cases"][0]["error_by_position"]
    lat = json.loads((folder / "latency.json").read_text(), parse_constant=pytest.fail)
    assert {r["backend"] for r in lat["rows"]} == {"torch", "hf"}
    for png in ("accuracy_error_by_position.png", "latency_decode.png"):
        assert (folder / png).read_bytes().startswith(PNG)
    md = (folder / "accuracy.md").read_text()
    assert (
        "# Accuracy: hf vs torch (fp32) — PASSED" in md and "| short |" in md and "fp16 overflow scan" in md
    )
    assert "| torch | decode | 2 | 12 |" in (folder / "latency.md").read_text()
    summary = (folder / "summary.md").read_text()
    assert "## Accuracy — PASSED" in summary and "## Latency" in summary and "| hf |" in summary


def test_summary_keeps_the_other_report(tmp_path, reports):
    accuracy, latency = reports
    write_reports(tmp_path, latency=latency)
    assert "## Accuracy" not in (tmp_path / "reports" / "summary.md").read_text()
    write_reports(tmp_path, accuracy=accuracy)  # a later validate run keeps bench's numbers in the summary
    summary = (tmp_path / "reports" / "summary.md").read_text()
    assert "## Accuracy — PASSED" in summary and "## Latency" in summary
    assert "No reports yet" in summary_markdown(None, None)


def test_failed_report_markdown_names_the_layer(tmp_path, make_checkpoint, torch_runner):
    from gemma4_compile.model.weights import load_model
    from gemma4_compile.validate import TorchRunner

    ckpt = make_checkpoint("tiny-31b")
    model = load_model(ckpt)
    model.layers[2].mlp.gate_proj.weight.data *= 1.05
    ref = torch_runner("tiny-31b")
    report = compare_runners(TorchRunner(ckpt, model=model), ref, default_cases(ref.spec)[2:3], steps=4)
    write_reports(tmp_path, accuracy=report)
    md = (tmp_path / "reports" / "accuracy.md").read_text()
    assert "FAILED" in md and "## Failures" in md and "### Per-layer error, case long" in md
    assert "| 2 | sliding |" in md and "← first divergent" in md
    acc = json.loads((tmp_path / "reports" / "accuracy.json").read_text())
    assert acc["passed"] is False and acc["cases"][0]["localization"]["first_layer"] == 2


def test_bench_contexts_straddle_the_window_and_fit_the_cache():
    from gemma4_compile.model.presets import PRESETS

    spec = PRESETS["tiny-e2b"]  # W = 8
    assert BenchConfig().contexts(spec, 4096) == (4, 8, 16, 32)
    config = BenchConfig(decode_steps=8, warmup=1)
    assert config.contexts(spec, 40) == (4, 8, 16, 30)  # 30 + 8 steps + 1 warm-up + 1 <= 40


def test_a_second_reference_writes_its_own_files(tmp_path, reports):
    """`--reference hf` must not overwrite the torch report; the summary lists both."""
    accuracy, _ = reports
    write_reports(tmp_path, accuracy=accuracy)
    other = dataclasses.replace(accuracy, reference="hf", backend="ort")
    written = {p.name for p in write_reports(tmp_path, accuracy=other)}
    assert {"accuracy-hf.json", "accuracy-hf.md", "accuracy-hf_error_by_position.png"} <= written
    folder = tmp_path / "reports"
    assert json.loads((folder / "accuracy.json").read_text())["reference"] == "torch"
    assert "(accuracy-hf_error_by_position.png)" in (folder / "accuracy-hf.md").read_text()
    summary = (folder / "summary.md").read_text()
    assert "Details: accuracy.md." in summary and "Details: accuracy-hf.md." in summary


def test_reports_get_the_mode_a_plain_write_gets(tmp_path, reports):
    """mkstemp makes private files; reports must be as readable as the export beside them."""
    accuracy, latency = reports
    plain = tmp_path / "export.json"
    plain.write_text("{}")
    for path in write_reports(tmp_path, accuracy=accuracy, latency=latency):
        assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777, path


def test_summary_rows_come_from_one_context_and_name_it(tmp_path, reports):
    _, latency = reports
    write_reports(tmp_path, latency=latency)
    summary = (tmp_path / "reports" / "summary.md").read_text()
    assert "TTFT ms (12-token prompt)" in summary and "decode p50 ms (context 12)" in summary
    assert "tok/s batch 2 (context 12)" in summary and "(torch p50 / p50)" in summary
    row = next(line for line in summary.splitlines() if line.startswith("| hf |"))
    hf_b1 = latency.row("hf", "decode", 1, 12)
    assert f"| {hf_b1.tokens_per_s:.0f} |" in row  # tok/s of the same row whose p50 is shown


def _engine(export, target, device_memory):
    folder = export / "engines" / target
    folder.mkdir(parents=True)
    (folder / "decoder.engine").write_bytes(b"\0" * 2**20)
    manifest = {"target": target, "flavour": "tensorrt_rtx", "trt_version": "1.3", "build_seconds": 21.0}
    (folder / "manifest.json").write_text(json.dumps({**manifest, "device_memory": device_memory}))


def test_summary_lists_engines_never_executed(tmp_path, reports):
    accuracy, _ = reports
    export = tmp_path / "export"
    _engine(export, "sm89", {})  # a manifest from before device memory was recorded
    _engine(export, "sm120", {"activation_bytes": 812 * 2**20, "weights_bytes": 3 * 2**20, "how": "log"})
    write_reports(tmp_path, accuracy=dataclasses.replace(accuracy, export_dir=str(export)))
    summary = (tmp_path / "reports" / "summary.md").read_text()
    assert "## Engines" in summary
    assert (
        "| sm89 | decoder | tensorrt_rtx 1.3 | 1.0 | 21 | device memory not recorded (built before it was recorded) "
        "| no: built" in summary
    )
    assert "| sm120 |" in summary and "device memory: activation 812.0 MiB + weights 3.0 MiB" in summary
    ran = dataclasses.replace(accuracy, export_dir=str(export), backend="trt", engine_target="sm120")
    write_reports(tmp_path, accuracy=ran)
    sm120 = next(
        line for line in (tmp_path / "reports" / "summary.md").read_text().splitlines() if "| sm120 |" in line
    )
    assert sm120.endswith("| yes (validate) |")


def test_summary_lists_every_graph_engine_of_a_target(tmp_path, reports):
    accuracy, _ = reports
    folder = tmp_path / "export" / "engines" / "sm89"
    folder.mkdir(parents=True)
    graphs = {}
    for role, mib in (("vision", 2), ("decoder", 3)):
        (folder / f"{role}.engine").write_bytes(b"\0" * mib * 2**20)
        graphs[role] = {"engine_file": f"{role}.engine", "build_seconds": mib * 10.0, "device_memory": {}}
    manifest = {
        "version": 2,
        "target": "sm89",
        "flavour": "tensorrt_rtx",
        "trt_version": "1.7",
        "graphs": graphs,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    ran = dataclasses.replace(
        accuracy, export_dir=str(tmp_path / "export"), backend="trt", engine_target="sm89"
    )
    write_reports(tmp_path, accuracy=ran)
    rows = [
        ln
        for ln in (tmp_path / "reports" / "summary.md").read_text().splitlines()
        if ln.startswith("| sm89 |")
    ]
    assert [r.split(" | ")[1:4] for r in rows] == [
        ["vision", "tensorrt_rtx 1.7", "2.0"],
        ["decoder", "tensorrt_rtx 1.7", "3.0"],
    ]
    assert rows[0].endswith("| no: built but never executed here |") and rows[1].endswith(
        "| yes (validate) |"
    )
