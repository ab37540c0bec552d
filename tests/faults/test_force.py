"""--force replaces only what this project wrote: an export (export.json in our format), a random checkpoint
(its marker file) or a compile output; anything else is refused in one line and left as it was."""

from __future__ import annotations

import json

import pytest
from faults_support import fake_export, snapshot

from gemma4_compile.cli import main
from gemma4_compile.errors import EXIT_ERROR, EXIT_OK
from gemma4_compile.export.manifest import ExportManifest
from gemma4_compile.fsutil import MARKER, is_project_output

VERBS = {
    "export": lambda ckpt, out: ["export", str(ckpt), "-o", str(out)],
    "init-random": lambda ckpt, out: [
        "init-random",
        "--preset",
        "tiny-e2b",
        "--dtype",
        "fp32",
        "-o",
        str(out),
    ],
    "compile": lambda ckpt, out: ["compile", str(ckpt), "-o", str(out)],
}


@pytest.mark.parametrize("verb", list(VERBS))
def test_force_refuses_a_directory_it_did_not_write(verb, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "export.json").write_text(json.dumps({"format": "someone-else"}))
    before = snapshot(tmp_path)
    assert main([*VERBS[verb](tiny_checkpoint, out), "--force"]) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was not written by gemma4-compile" in err[0], err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("verb", list(VERBS))
def test_without_force_an_existing_output_is_refused(verb, tiny_checkpoint, tmp_path, capsys):
    out = fake_export(tmp_path / "out")
    before = snapshot(tmp_path)
    assert main(VERBS[verb](tiny_checkpoint, out)) == EXIT_ERROR
    assert "use --force" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_force_replaces_its_own_checkpoint(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(VERBS["init-random"](None, out)) == EXIT_OK
    assert json.loads((out / MARKER).read_text()) == {"kind": "checkpoint"} and is_project_output(out)
    config = (out / "config.json").read_text()
    assert main([*VERBS["init-random"](None, out), "--seed", "7", "--force"]) == EXIT_OK
    assert (out / "config.json").read_text() == config and is_project_output(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no lock, temp or old folder left beside it


@pytest.mark.slow
def test_force_replaces_its_own_export(tiny_checkpoint, tmp_path):
    out = fake_export(tmp_path / "out")
    assert main([*VERBS["export"](tiny_checkpoint, out), "--force"]) == EXIT_OK
    assert (
        ExportManifest.load(out).spec.num_hidden_layers > 0
        and (out / "decoder.onnx").read_bytes() != b"previous output"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_is_project_output_recognizes_each_kind(tmp_path):
    assert is_project_output(fake_export(tmp_path / "export"))
    compiled = tmp_path / "compiled"  # a compile output from before the marker: reports/ beside an export
    (compiled / "reports").mkdir(parents=True)
    fake_export(compiled / "export")
    assert is_project_output(compiled)
    for foreign in ("plain", "reports-only"):
        (tmp_path / foreign / "reports").mkdir(parents=True)
        assert not is_project_output(tmp_path / foreign)


def test_a_compile_outputs_stage_directories_are_its_own(tmp_path):
    """`compile --force` rewrites OUT/checkpoint and OUT/export; an older compile output has no marker in them."""
    compiled = tmp_path / "compiled"
    (compiled / "reports").mkdir(parents=True)
    fake_export(compiled / "export")
    (compiled / "checkpoint").mkdir()
    (compiled / "checkpoint" / "config.json").write_text("{}")
    assert is_project_output(compiled / "checkpoint")
    (tmp_path / "elsewhere" / "checkpoint").mkdir(parents=True)
    assert not is_project_output(tmp_path / "elsewhere" / "checkpoint")
