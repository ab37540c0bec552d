"""The CLI: thin verbs, one-line errors with non-zero exits, no tracebacks, no half-written output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gemma4_compile.cli import main
from gemma4_compile.errors import EXIT_ERROR, EXIT_VALIDATION_FAILED

VERBS = ["init-random", "export", "build", "kernels", "validate", "bench", "compile", "inspect", "matrix"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemma4_compile.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb, capsys):
    assert main([verb, "--help"]) == 0
    assert "Usage:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["export", "/nonexistent/ckpt", "-o", "/tmp/never"],
            "checkpoint directory /nonexistent/ckpt does not exist",
        ),
        (["init-random", "--preset", "e3b", "-o", "x"], "Invalid value for '--preset'"),
        (
            ["init-random", "--preset", "tiny-31b", "-o", "x", "--max-shard-size", "lots"],
            "cannot read size 'lots'",
        ),
        (["validate", "/nonexistent/export"], "no export.json"),
        (["build", "/nonexistent/export", "--target", "sm89"], "export.json"),
        (["inspect"], "give a checkpoint or export directory"),
        (["frobnicate"], "No such command"),
    ],
)
def test_errors_are_one_line_without_traceback(args, message):
    result = run(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_debug_flag_shows_the_traceback():
    result = run("--debug", "export", "/nonexistent/ckpt", "-o", "/tmp/never")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_init_random_then_inspect(tmp_path):
    out = tmp_path / "ck"
    result = run("init-random", "--preset", "tiny-26b-a4b", "-o", str(out), "--seed", "3", "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["text_config"]["num_experts"] == 8
    shown = run("inspect", str(out))
    assert shown.returncode == 0 and "K=V" in shown.stdout and "global" in shown.stdout
    again = run("init-random", "--preset", "tiny-26b-a4b", "-o", str(out))
    assert again.returncode == 1 and "use --force" in again.stderr


def test_export_refuses_an_existing_directory_and_leaves_it_alone(tmp_path, make_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("export", str(make_checkpoint("tiny-31b")), "-o", str(out))
    assert result.returncode == 1 and "already exists" in result.stderr
    assert (out / "keep.txt").read_text() == "mine" and not (out / "export.json").exists()


class FailedReport:
    """What a validation run that completed and disagreed hands back."""

    passed = False

    def summary(self) -> str:
        return "case long-prompt: FAILED"

    def failure_message(self) -> str:
        return "case long-prompt: max |Δlogit| 3.1 > 1e-4"


def test_a_failed_validation_exits_2_from_validate(monkeypatch, capsys):
    import gemma4_compile.validate as stage

    monkeypatch.setattr(stage, "validate", lambda *a, **k: FailedReport(), raising=False)
    assert main(["validate", "some-export"]) == EXIT_VALIDATION_FAILED == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: case long-prompt: max |Δlogit| 3.1 > 1e-4"]


def test_a_failed_validation_exits_2_from_compile(monkeypatch, tmp_path, capsys):
    import gemma4_compile.pipeline as pipeline

    summary = tmp_path / "summary.md"
    summary.write_text("# summary\nvalidate: FAILED\n")
    failed = pipeline.PipelineResult(tmp_path, summary, passed=False)
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *a, **k: failed)
    assert main(["compile", "-o", str(tmp_path / "out")]) == EXIT_VALIDATION_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: validation failed; see {summary}"]


def test_bad_input_exits_1_from_every_verb(tmp_path):
    """A usage error (click) and a stage's own error share the one exit code for bad input."""
    assert run("init-random", "--preset", "e3b", "-o", str(tmp_path / "x")).returncode == EXIT_ERROR
    assert run("validate", str(tmp_path / "missing")).returncode == EXIT_ERROR
    assert run("compile").returncode == EXIT_ERROR  # -o is required
