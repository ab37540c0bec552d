"""The CLI: thin verbs, one-line errors with non-zero exits, no tracebacks, no half-written output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gemma4_compile.cli import main

VERBS = ["init-random", "export", "build", "kernels", "validate", "bench", "compile", "inspect"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemma4_compile.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb, capsys):
    assert main([verb, "--help"]) == 0
    assert "Usage:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["export", "/nonexistent/ckpt", "-o", "/tmp/never"], "checkpoint directory /nonexistent/ckpt does not exist"),
        (["init-random", "--preset", "e3b", "-o", "x"], "Invalid value for '--preset'"),
        (["init-random", "--preset", "tiny-31b", "-o", "x", "--max-shard-size", "lots"], "cannot read size 'lots'"),
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
