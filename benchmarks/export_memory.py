"""Peak memory of the two streaming stages on a full-size checkpoint.

    python benchmarks/export_memory.py [--preset e2b] [--workdir /tmp/g4mem] [--keep]

1. `gemma4-compile init-random --preset e2b` (5.1 B parameters, bf16, ~10 GB): must stay under 2 GiB RSS.
2. `gemma4-compile export --dtype bf16` of that checkpoint: must stay under 1 GiB RSS.
3. a plain copy of the checkpoint (`cp -r`), for scale.
Each step runs as its own process under /usr/bin/time -v (its own peak RSS). Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import report

CLI = [sys.executable, "-m", "gemma4_compile.cli"]


def run(cmd: list[str]) -> tuple[float, float]:
    """-> (wall seconds, peak RSS MiB of that process alone, from /usr/bin/time -v)."""
    t0 = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-v", *cmd],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wall = time.perf_counter() - t0
    line = next(x for x in done.stderr.splitlines() if "Maximum resident set size" in x)
    return wall, int(line.split(":")[1]) / 1024


def du(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="e2b")
    ap.add_argument("--workdir", default="/tmp/g4mem")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt, out, copy = work / "ckpt", work / "export", work / "copy"
    rows, payload = [], {"benchmark": "export_memory", "preset": args.preset}
    try:
        wall, rss = run([*CLI, "init-random", "--preset", args.preset, "-o", str(ckpt), "--dtype", "bf16"])
        rows.append(["init-random (bf16)", wall, rss, du(ckpt)])
        payload["init_random"] = {"seconds": wall, "peak_rss_mib": rss, "gib": du(ckpt)}
        wall, rss = run(
            [*CLI, "export", str(ckpt), "-o", str(out), "--dtype", "bf16", "--max-seq-len", "4096"]
        )
        rows.append(["export (bf16)", wall, rss, du(out)])
        payload["export"] = {"seconds": wall, "peak_rss_mib": rss, "gib": du(out)}
        t0 = time.perf_counter()
        shutil.copytree(ckpt, copy)
        wall = time.perf_counter() - t0
        rows.append(["plain copy of the checkpoint", wall, float("nan"), du(copy)])
        payload["copy_seconds"] = wall
        payload["export_vs_copy"] = payload["export"]["seconds"] / wall
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(
        f"streaming memory, full-size {args.preset}",
        ["step", "wall s", "peak RSS MiB", "output GiB"],
        rows,
        payload,
    )


if __name__ == "__main__":
    main()
