"""An output that is the input, holds it, lies inside it, or is the working directory, home or a filesystem root
is refused in one line before any work, even with --force, and nothing on disk changes."""

from __future__ import annotations

from pathlib import Path

import pytest
from faults_support import snapshot

from gemma4_compile.cli import main
from gemma4_compile.errors import EXIT_ERROR, ExportError
from gemma4_compile.fsutil import check_output_path


def refused(args: list[str], capsys) -> str:
    assert main(args) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: output "), err
    return err[0]


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path) -> Path:
    """A private copy, so a test that got it wrong could not damage the session's checkpoint."""
    import shutil

    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


@pytest.mark.parametrize(
    "output,expected",
    [
        (lambda c: c, "is the input"),
        (lambda c: c.parent, "contains the input"),
        (lambda c: c / "export", "is inside the input"),
    ],
)
@pytest.mark.parametrize("verb", ["export", "compile"])
def test_output_must_not_touch_the_input(verb, output, expected, ckpt, capsys):
    before = snapshot(ckpt.parent)
    assert expected in refused([verb, str(ckpt), "-o", str(output(ckpt)), "--force"], capsys)
    assert snapshot(ckpt.parent) == before


@pytest.mark.parametrize(
    "output,expected",
    [
        (".", "is the working directory"),
        ("..", "contains the working directory"),
        ("/", "is a filesystem root"),
        ("~", "is the home directory"),
    ],
)
@pytest.mark.parametrize("verb", ["export", "init-random", "compile"])
def test_output_must_not_be_a_directory_nobody_means_to_lose(
    verb, output, expected, ckpt, tmp_path, monkeypatch, capsys
):
    home, work = tmp_path / "home", tmp_path / "home" / "projects" / "work"
    work.mkdir(parents=True)
    (work / "mine.txt").write_text("keep")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    target = str(Path(output).expanduser())
    args = {
        "export": ["export", str(ckpt), "-o", target],
        "init-random": ["init-random", "--preset", "tiny-e2b", "-o", target],
        "compile": ["compile", str(ckpt), "-o", target],
    }[verb]
    before = snapshot(home)
    assert expected in refused([*args, "--force"], capsys)
    assert snapshot(home) == before and not list(work.parent.glob(".*.lock"))


def test_check_output_path_raises_the_stage_error(tmp_path):
    with pytest.raises(ExportError, match="is the input"):
        check_output_path(tmp_path / "a", inputs=[tmp_path / "a"], error=ExportError)
    check_output_path(tmp_path / "b", inputs=[tmp_path / "a"], error=ExportError)  # a sibling is fine
