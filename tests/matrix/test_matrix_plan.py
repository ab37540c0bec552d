"""Plans: the shipped examples parse and expand, bad plans fail in one line naming the key, the dependency edges
are explicit, the index rolls jobs up into rows. Quick: nothing here runs a job."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gemma4_compile.errors import UsageError
from gemma4_compile.matrix import expand, load_plan
from gemma4_compile.matrix.index import rows
from gemma4_compile.matrix.plan import GIB, GPU_BUILDER

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE, TINY = ROOT / "examples" / "matrix.toml", ROOT / "examples" / "matrix-tiny.toml"


def test_docs_show_the_example_plan_verbatim():
    """docs/matrix.md's example is examples/matrix.toml, which this file parses: the doc cannot rot."""
    doc = (ROOT / "docs" / "matrix.md").read_text()
    assert EXAMPLE.read_text().strip() in doc


def test_example_expands_with_shared_exports_and_gpu_builds():
    plan = load_plan(EXAMPLE)
    jobs = {j.id: j for j in expand(plan)}
    builds = [j for j in jobs.values() if j.kind == "build"]
    assert len(builds) == 2 * 2 * 5  # checkpoints x dtypes x targets
    export = "export:e2b/bf16"
    assert sum(1 for j in builds if j.deps == (export,)) == 5  # one export, five builds wait for it
    assert jobs[export].deps == ("checkpoint:e2b",)
    sm90 = jobs["build:e2b/bf16/sm90"]
    assert sm90.params["builder"] == GPU_BUILDER and sm90.resources.gpu == "sm90"
    assert jobs["build:e2b/bf16/sm89"].resources.gpu is None  # TensorRT-RTX: any CPU node
    assert jobs["validate:e2b/bf16/sm89"].resources.gpu == "sm89"
    # declared from measured peaks: two full-size e2b builds never fit one 24 GiB node
    assert 12 * GIB < sm90.resources.memory <= 24 * GIB


def test_tiny_plan_is_two_presets_two_dtypes_two_rtx_targets():
    jobs = expand(load_plan(TINY))
    builds = [j for j in jobs if j.kind == "build"]
    assert {j.row for j in builds} == {
        (m, d, t) for m in ("tiny-31b", "tiny-e2b") for d in ("fp32", "fp16") for t in ("sm89", "sm120")
    }
    assert all(j.resources.gpu is None for j in builds)
    order = [j.id for j in jobs]
    assert all(order.index(d) < order.index(j.id) for j in jobs for d in j.deps)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[export]\ndtypes=['fp32']\n", r"checkpoints: expected at least one"),
        ("[[checkpoints]]\npreset='nope'\n", r"checkpoints\[0\]\.preset: unknown preset 'nope'"),
        (
            "[[checkpoints]]\npreset='tiny-31b'\npath='x'\n",
            r"checkpoints\[0\]: expected a table with exactly one",
        ),
        ("[[checkpoints]]\npath='missing'\n", r"checkpoints\[0\]\.path: .*missing is not a directory"),
        (
            "[[checkpoints]]\npreset='tiny-31b'\n[build]\ntargets=['sm999']\n",
            r"build\.targets: unknown GPU target",
        ),
        (
            "[[checkpoints]]\npreset='tiny-31b'\n[export]\ndtypes=['fp8']\n",
            r"export\.dtypes: expected a non-empty",
        ),
        (
            "[[checkpoints]]\npreset='tiny-31b'\n[build]\nmax_batch=0\n",
            r"build\.max_batch: expected a positive",
        ),
        ("[[checkpoints]]\npreset='tiny-31b'\n[build]\nopt_levl=1\n", r"build\.opt_levl: unknown key"),
        ("[[checkpoints]]\npreset='tiny-31b'\n[build]\nopt_level=7\n", r"build\.opt_level: expected 0\.\.5"),
        ("[[checkpoints]]\npreset='tiny-31b'\n[bild]\n", r"bild: unknown section"),
        ("[[checkpoints]\n", r"not valid TOML"),
    ],
)
def test_bad_plans_fail_in_one_line_naming_file_and_key(tmp_path, text, message):
    plan = tmp_path / "plan.toml"
    plan.write_text(text)
    with pytest.raises(UsageError) as e:
        load_plan(plan)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(plan))
    assert re.search(message, str(e.value)), str(e.value)


def test_index_rows_roll_up_failures_and_skips():
    jobs = expand(load_plan(TINY))
    records = {j.id: {"status": "done", "output": "x", "verdict": "passed"} for j in jobs}
    records["export:tiny-31b/fp16"] = {"status": "failed", "reason": "boom"}
    records["build:tiny-31b/fp16/sm89"] = {
        "status": "skipped",
        "reason": "depends on failed export:tiny-31b/fp16",
    }
    records["validate:tiny-e2b/fp32/sm120"] = {"status": "skipped", "reason": "not executed: needs a GPU"}
    table = {(r["model"], r["precision"], r["target"]): r for r in rows(jobs, records)}
    assert table[("tiny-31b", "fp16", "onnxruntime")]["status"] == "failed"
    assert table[("tiny-31b", "fp16", "onnxruntime")]["reason"] == "export: boom"
    assert table[("tiny-31b", "fp16", "sm89")]["status"] == "skipped"
    engine = table[("tiny-e2b", "fp32", "sm120")]
    assert engine["status"] == "done" and engine["verdict"] == "not executed"
    assert engine["reason"] == "validate: not executed: needs a GPU"


def test_cli_refuses_a_bad_plan_and_a_foreign_output_in_one_line(tmp_path, capsys):
    from gemma4_compile.cli import main
    from gemma4_compile.errors import EXIT_ERROR

    bad = tmp_path / "bad.toml"
    bad.write_text("[[checkpoints]]\npreset = 'tiny-31b'\n[run]\nretries = 'many'\n")
    assert main(["matrix", str(bad), "-o", str(tmp_path / "out")]) == EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert err == f"error: {bad}: run.retries: expected int, got 'many'"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["matrix", str(TINY), "-o", str(foreign)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "is not a matrix output" in err and err.count("\n") == 1
    assert (foreign / "notes.txt").read_text() == "mine" and not (foreign / "jobs").exists()
    new = tmp_path / "new"
    assert main(["matrix", str(TINY), "-o", str(new), "--address", "head:6379"]) == EXIT_ERROR
    assert capsys.readouterr().err == "error: --address is for --executor ray\n" and not new.exists()
