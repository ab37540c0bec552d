"""Either old or new: a run killed at any point of writing or swapping leaves, at the output path, the old
output or the new one, never neither and never a mix; what a killed run leaves beside it (`.NAME.tmp.*`,
`.NAME.old.*`) is put right by the next run on the same output.

A SIGKILL runs no cleanup, so it is simulated in a forked child that calls os._exit at the chosen moment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from faults_support import fake_export, snapshot

from gemma4_compile import fsutil
from gemma4_compile.cli import main
from gemma4_compile.errors import EXIT_OK, ExportError

KILLED = 137


def write_new(tmp: Path) -> None:
    (tmp / "export.json").write_text('{"format": "gemma4-compile/export", "version": 1, "new": true}')
    (tmp / "decoder.onnx").write_bytes(b"new output")


def run_killed(out: Path, kill_at: str) -> int:
    """Replace `out` in a child that dies (no cleanup) at `kill_at`: 'writing' (inside the block), or before /
    after the n-th os.replace ('before-1', 'after-1', 'before-2', 'after-2'); returns the child's status."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            calls = 0
            real = os.replace

            def replace(src, dst):
                nonlocal calls
                calls += 1
                if kill_at == f"before-{calls}":
                    os._exit(KILLED)
                real(src, dst)
                if kill_at == f"after-{calls}":
                    os._exit(KILLED)

            fsutil.os.replace = replace
            with fsutil.atomic_directory(out, ExportError, force=True) as tmp:
                write_new(tmp)
                if kill_at == "writing":
                    os._exit(KILLED)
            os._exit(0)
        finally:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.parametrize("kill_at", ["writing", "before-1", "after-1", "before-2", "after-2"])
def test_a_kill_at_any_moment_leaves_the_old_or_the_new_output(kill_at, tmp_path):
    out = fake_export(tmp_path / "out")
    old = snapshot(out)
    assert run_killed(out, kill_at) == KILLED
    with fsutil.output_lock(out):
        fsutil.recover_stale(out)  # what the next run does first
    new = {"export.json", "decoder.onnx"}
    assert snapshot(out) == old or (
        set(snapshot(out)) == new and (out / "decoder.onnx").read_bytes() == b"new output"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_next_cli_run_cleans_up_after_a_killed_one(tmp_path):
    out = tmp_path / "ck"
    assert main(["init-random", "--preset", "tiny-e2b", "-o", str(out)]) == EXIT_OK
    assert run_killed(out, "after-1") == KILLED  # the old checkpoint now sits under .ck.old.*, nothing at ck
    assert not out.exists() and len(list(tmp_path.glob(".ck.old.*"))) == 1
    (tmp_path / ".ck.tmp.leftover").mkdir()
    assert main(["init-random", "--preset", "tiny-e2b", "-o", str(out), "--force"]) == EXIT_OK
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"] and fsutil.is_project_output(out)


def test_a_failed_second_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    out = fake_export(tmp_path / "out")
    old = snapshot(out)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", replace)
    with (
        pytest.raises(ExportError, match="cannot write .*No space left"),
        fsutil.atomic_directory(out, ExportError, force=True) as tmp,
    ):
        write_new(tmp)
    assert snapshot(out) == old and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_error_while_writing_leaves_the_old_output(tmp_path):
    out = fake_export(tmp_path / "out")
    old = snapshot(out)
    with pytest.raises(KeyboardInterrupt), fsutil.atomic_directory(out, ExportError, force=True) as tmp:
        write_new(tmp)
        raise KeyboardInterrupt
    assert snapshot(out) == old and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
