"""One writer per output: while a run holds OUT, a second run into OUT is refused in one line and changes
nothing; the lock goes away with the run."""

from __future__ import annotations

import subprocess
import sys

import pytest
from faults_support import cli, cli_env, one_error_line, snapshot

from gemma4_compile.cli import main
from gemma4_compile.errors import EXIT_ERROR, EXIT_OK, CheckpointError
from gemma4_compile.fsutil import output_lock

HOLD = """
import sys, time
from pathlib import Path
from gemma4_compile.fsutil import output_lock
with output_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def held_by_another_process(tmp_path):
    """A second process holding the lock on tmp_path/out, as a running export would."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=cli_env()
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield out
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("verb", ["init-random", "export", "compile"])
def test_a_second_run_into_the_same_output_is_refused(verb, held_by_another_process, tiny_checkpoint):
    out = held_by_another_process
    out.mkdir()
    (out / "export.json").write_text('{"format": "gemma4-compile/export", "version": 1}')
    before = snapshot(out.parent)
    args = {
        "init-random": ["init-random", "--preset", "tiny-e2b"],
        "export": ["export", str(tiny_checkpoint)],
        "compile": ["compile", str(tiny_checkpoint)],
    }[verb]
    result = cli(*args, "-o", str(out), "--force")
    assert result.returncode == EXIT_ERROR
    assert "is being written by another gemma4-compile run" in one_error_line(result)
    assert snapshot(out.parent) == before


def test_the_lock_is_released_when_the_run_ends(tmp_path, capsys):
    out = tmp_path / "ck"
    with output_lock(out, CheckpointError):
        assert (
            main(["init-random", "--preset", "tiny-e2b", "-o", str(out)]) == EXIT_ERROR
        )  # same process, same rule
        assert "being written by another" in capsys.readouterr().err and not out.exists()
    assert main(["init-random", "--preset", "tiny-e2b", "-o", str(out)]) == EXIT_OK
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_the_lock_is_released_on_failure(tmp_path):
    out = tmp_path / "x"
    with pytest.raises(RuntimeError), output_lock(out):
        raise RuntimeError("boom")
    with output_lock(out):  # free again
        pass
    assert list(tmp_path.iterdir()) == []
