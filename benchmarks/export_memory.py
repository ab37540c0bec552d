"""Peak memory of the two streaming stages on a full-size checkpoint, with and without the towers.

    python benchmarks/export_memory.py [--preset e2b] [--workdir /tmp/g4mem] [--keep] [--checkpoint CKPT]
        [--quant int4] [--quant-dtype fp32] [--block-size 32]

1. `gemma4-compile init-random --preset e2b` (bf16, the released layout: text + vision + audio towers, ~10 GB):
   must stay under 2 GiB RSS.
2. `gemma4-compile export --dtype bf16` of that checkpoint once per graph set, each from the same checkpoint:
   `--modalities text` (embed + decoder), `text,vision` (+ vision.onnx) and every tower it has (+ audio.onnx on
   E2B/E4B). Each must stay under 1 GiB RSS: the tower weights stream as the text weights do.
3. `gemma4-compile export --quant int4 --dtype fp32 --modalities text` of the same checkpoint (quantized inside
   the streaming writer; `--quant none` skips it): the same 1 GiB bound, its wall time beside the bf16 export's.
4. a plain copy of the checkpoint (`cp -r`), for scale.
`--checkpoint` exports an existing bf16 checkpoint instead of step 1 (it is never deleted).
Each step runs as its own process under /usr/bin/time -v: its "Maximum resident set size" is the kernel's RSS
high-water mark (VmHWM) of that process. Each export is deleted once measured, so the disk holds the checkpoint
and one export at a time. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import report

CLI = [sys.executable, "-m", "gemma4_compile.cli"]
EXPORT_LIMIT_MIB = 1024


def run(cmd: list[str]) -> tuple[float, float]:
    """-> (wall seconds, peak RSS MiB of that process alone, from /usr/bin/time -v); a failed command exits
    with its own one-line error."""
    t0 = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-v", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wall = time.perf_counter() - t0
    if done.returncode:
        errors = [x for x in done.stderr.splitlines() if x.startswith("error")] or done.stderr.splitlines()[
            -1:
        ]
        raise SystemExit(f"{cmd[3]} failed: {errors[0] if errors else done.returncode}")
    line = next(x for x in done.stderr.splitlines() if "Maximum resident set size" in x)
    return wall, int(line.split(":")[1]) / 1024


def du(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


def graph_sets(ckpt: Path) -> list[str]:
    """text, then text plus each tower the checkpoint has, in turn (the embed graph merges audio beside images
    only, so audio comes after vision)."""
    config = json.loads((ckpt / "config.json").read_text())
    towers = [t for t in ("vision", "audio") if config.get(f"{t}_config")]
    return [",".join(["text", *towers[:n]]) for n in range(len(towers) + 1)]


def export_row(
    ckpt: Path, out: Path, modalities: str, flags: tuple[str, ...] = ("--dtype", "bf16")
) -> tuple[list[object], dict[str, object]]:
    """Export one graph set with `flags`, measure it, then delete it."""
    wall, rss = run(
        [
            *CLI,
            "export",
            str(ckpt),
            "-o",
            str(out),
            *flags,
            "--max-seq-len",
            "4096",
            "--modalities",
            modalities,
        ]
    )
    graphs = sorted(p.name for p in out.glob("*.onnx"))
    size = du(out)
    shutil.rmtree(out)
    row = [f"export --modalities {modalities} {' '.join(flags)}", wall, rss, size, " ".join(graphs)]
    return row, {
        "seconds": wall,
        "peak_rss_mib": rss,
        "gib": size,
        "graphs": graphs,
        "under_bound": rss < EXPORT_LIMIT_MIB,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="e2b")
    ap.add_argument("--workdir", default="/tmp/g4mem")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint (exports are always deleted)")
    ap.add_argument("--checkpoint", type=Path, help="export this checkpoint instead of writing one")
    ap.add_argument("--quant", default="int4", help="the quantized export's --quant (none: skip it)")
    ap.add_argument(
        "--quant-dtype", default="fp32", help="its --dtype (fp32: MatMulNBits; fp16/bf16: DQ form)"
    )
    ap.add_argument("--block-size", default="32")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt, out, copy = args.checkpoint or work / "ckpt", work / "export", work / "copy"
    rows, payload = [], {"benchmark": "export_memory", "preset": args.preset, "exports": {}}
    try:
        if args.checkpoint is None:
            wall, rss = run(
                [*CLI, "init-random", "--preset", args.preset, "-o", str(ckpt), "--dtype", "bf16"]
            )
            rows.append(["init-random (bf16, with towers)", wall, rss, du(ckpt), ""])
            payload["init_random"] = {"seconds": wall, "peak_rss_mib": rss, "gib": du(ckpt)}
        for modalities in graph_sets(ckpt):
            row, payload["exports"][modalities] = export_row(ckpt, out, modalities)
            rows.append(row)
        if args.quant != "none":
            flags = ("--quant", args.quant, "--block-size", args.block_size, "--dtype", args.quant_dtype)
            row, payload["export_quant"] = export_row(ckpt, out, "text", flags)
            rows.append(row)
        t0 = time.perf_counter()
        shutil.copytree(ckpt, copy)
        wall = time.perf_counter() - t0
        rows.append(["plain copy of the checkpoint", wall, float("nan"), du(copy), ""])
        payload["copy_seconds"] = wall
        shutil.rmtree(copy)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(
        f"streaming memory, full-size {args.preset} (export bound {EXPORT_LIMIT_MIB} MiB)",
        ["step", "wall s", "peak RSS MiB", "output GiB", "graphs"],
        rows,
        payload,
    )


if __name__ == "__main__":
    main()
