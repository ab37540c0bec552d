"""Ctrl-C during `export` (tracing, or writing the files) ends with `error: interrupted`, exit 130, the previous
output untouched and nothing left beside it (no temp folder, no lock)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faults_support import TORCH_LOG, cli_env, fake_export, snapshot

from gemma4_compile.errors import EXIT_INTERRUPTED


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    """Poll until `condition()` (the export reached the point under test); the export must still be running."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"export ended (rc {proc.returncode}) before the point under test"
        assert time.monotonic() < deadline, "export never reached the point under test"
        time.sleep(0.02)


def temp_dirs(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.tmp.*"))


POINTS = {
    # the temporary folder exists and is still empty: the graphs are being traced
    "tracing": lambda out: bool(temp_dirs(out)) and not any(temp_dirs(out)[0].iterdir()),
    # the first file landed in the temporary folder: weights / graphs are being written
    "writing": lambda out: any(any(d.iterdir()) for d in temp_dirs(out)),
}


@pytest.mark.parametrize("point", ["tracing", pytest.param("writing", marks=pytest.mark.slow)])
def test_ctrl_c_during_export_leaves_the_previous_output(point, tiny_checkpoint, tmp_path):
    out = fake_export(tmp_path / "out")
    before = snapshot(out)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gemma4_compile.cli",
            "export",
            str(tiny_checkpoint),
            "-o",
            str(out),
            "--force",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        wait_for(lambda: POINTS[point](out), proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = [ln for ln in stderr.strip().splitlines() if ln and not TORCH_LOG.match(ln)]
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    assert lines == ["error: interrupted"], stderr[-3000:]
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
