"""User mistakes get one line naming what was expected, found as early as possible; a normal run prints no
third-party warning lines (--verbose shows them); every option's --help states its default."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from faults_support import cli, cli_env

from gemma4_compile.cli import cli as group
from gemma4_compile.cli import main
from gemma4_compile.errors import EXIT_ERROR, EXIT_OK


def one_line(args: list[str], capsys) -> str:
    assert main(args) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "internal error" not in err[0], err
    return err[0]


@pytest.mark.parametrize(
    "output,expected",
    [
        (lambda f: f, "is a file; give a directory"),
        (lambda f: f / "sub", "which is a file; give a directory"),
    ],
)
@pytest.mark.parametrize("verb", ["export", "init-random", "compile"])
def test_output_pointing_at_a_file_is_refused(verb, output, expected, tiny_checkpoint, tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("keep")
    target = str(output(file))
    args = {
        "export": ["export", str(tiny_checkpoint), "-o", target, "--force"],
        "init-random": ["init-random", "--preset", "tiny-e2b", "-o", target, "--force"],
        "compile": ["compile", str(tiny_checkpoint), "-o", target, "--force"],
    }[verb]
    assert expected in one_line(args, capsys)
    assert file.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_compile_with_an_unknown_target_fails_before_the_export(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    line = one_line(["compile", str(tiny_checkpoint), "-o", str(out), "--target", "sm42"], capsys)
    assert "unknown GPU target 'sm42'" in line and not out.exists()


@pytest.mark.parametrize("steps", ["256", "1000", "0"])
def test_validate_steps_beyond_the_export_are_one_line(steps, make_export, capsys):
    line = one_line(["validate", str(make_export("tiny-e2b")), "--steps", steps], capsys)
    assert "--steps must be in [1, 255] (the export's max_seq_len is 256)" in line


def test_a_file_system_refusal_is_one_line(make_export, tmp_path, capsys):
    export = Path(shutil.copytree(make_export("tiny-e2b"), tmp_path / "export"))
    (export / "reports").write_text("a file where validate writes its reports")
    line = one_line(["validate", str(export), "--steps", "1"], capsys)
    assert "reports" in line


def test_every_option_states_its_default():
    for name, command in group.commands.items():
        ctx = click.Context(command, info_name=name)
        for param in command.get_params(ctx):
            if isinstance(param, click.Option) and "--help" not in param.opts:
                record = param.get_help_record(ctx)
                assert record and re.search(r"\[(default: |required)", record[1]), (name, param.name)


def test_steps_default_in_help_is_the_validate_default(capsys):
    from gemma4_compile.validate.cases import DEFAULT_STEPS

    assert main(["validate", "--help"]) == EXIT_OK
    assert f"[default: {DEFAULT_STEPS}]" in capsys.readouterr().out


REGISTRY = (
    "import sys; from gemma4_compile.cli import third_party_output; third_party_output(sys.argv[1] == 'v'); "
    "from torch.onnx._internal.exporter import _registration; _registration.ONNXRegistry.from_torchlib()"
)


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_log_lines_only_with_verbose(verbose):
    """torch.onnx's "Skipping torchvision::nms" lines, as an export's first step prints them."""
    arg = "v" if verbose else "q"
    env = cli_env()
    env.pop("TORCH_LOGS", None)  # an earlier in-process run set it; torch cannot even import with it empty
    result = subprocess.run([sys.executable, "-c", REGISTRY, arg], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert ("Skipping torchvision" in result.stderr) == verbose, result.stderr


def test_a_normal_export_prints_no_third_party_lines(tiny_checkpoint, tmp_path):
    result = cli("export", str(tiny_checkpoint), "-o", str(tmp_path / "out"), "--max-seq-len", "64")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
