"""Engine build cost per preset: build time, peak host RAM and engine size.

    python benchmarks/engine_build.py                          # every tiny preset, bf16, sm89
    python benchmarks/engine_build.py --presets tiny-e2b --targets sm89,sm120 --dtype fp16
    python benchmarks/engine_build.py --full e2b               # also the full-size E2B, or exactly why not
    python benchmarks/engine_build.py --presets "" --full e2b --quant int4 --block-size 128 \
        --quant-override lm_head=int4 --profiles decode --max-seq 1024

Each preset: random checkpoint -> gemma4_compile.export -> gemma4_compile.engines.build_engines. Every build runs
in a fresh subprocess, so its peak RSS is its own and a watchdog can stop it before the machine runs out of RAM.
Prints a table, then one JSON line. Benchmarks report; they never assert.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

GIB = 1 << 30
BUILD = """
import json, sys
from gemma4_compile.engines import BuildOptions, build_engines
export, target, max_batch, max_seq, profiles = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
options = BuildOptions(max_batch=max_batch, max_seq=max_seq, force=True, progress=False,
                       profiles=tuple(profiles.split(",")))
(art,) = build_engines(export, [target], options)
print(json.dumps(art.manifest.to_dict()))
"""


@dataclass(frozen=True)
class Row:
    preset: str
    dtype: str
    quant: str  # "none" or the export's --quant format (and block)
    target: str
    decoder_weight_bytes: int | None
    export_s: float | None
    build_s: float | None  # parse + build, as the manifest records it
    peak_rss_bytes: int | None  # sampled inside the build process
    rss_growth_bytes: int | None  # peak minus the RSS when the build started (interpreter + TensorRT import)
    engine_bytes: int | None
    status: str  # "ok" or why not


# ----- steps ------------------------------------------------------------------------------------


def _export(preset: str, dtype: str, work: Path, args) -> tuple[Path, float | None]:
    """-> (export dir, seconds); an existing export of the same dtype, quantization and max_seq_len is reused
    (seconds None). WORK/ckpt-PRESET may be a link to a checkpoint made before (the full-size ones take minutes)."""
    import torch

    from gemma4_compile.export import export_checkpoint
    from gemma4_compile.model.checkpoint import write_random_checkpoint
    from gemma4_compile.model.presets import PRESETS
    from gemma4_compile.quant.formats import QuantRequest

    ckpt = work / f"ckpt-{preset}"
    if not (ckpt / "config.json").is_file():
        write_random_checkpoint(PRESETS[preset], ckpt, seed=0, dtype=torch.bfloat16)
    out = work / f"export-{preset}-{dtype}-{_quant_name(args)}"
    if (out / "export.json").is_file():
        meta = json.loads((out / "export.json").read_text())
        if (meta.get("dtype"), meta.get("max_seq_len")) == (dtype, args.max_seq):
            return out, None
    overrides = tuple(tuple(o.split("=", 1)) for o in args.quant_override)
    quant = QuantRequest(args.quant, args.block_size, overrides=overrides) if args.quant != "none" else None
    t0 = time.perf_counter()
    export_checkpoint(ckpt, out, dtype=dtype, max_seq_len=args.max_seq, force=True, quant=quant)
    return out, time.perf_counter() - t0


def _quant_name(args) -> str:
    if args.quant == "none":
        return "none"
    return "-".join([f"{args.quant}-b{args.block_size or 'default'}", *args.quant_override]).replace("=", "_")


def decoder_weight_bytes(export_dir: Path) -> int:
    """Bytes of external weights decoder.onnx references (what the builder must hold)."""
    import onnx

    model = onnx.load(str(export_dir / "decoder.onnx"), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        meta = {e.key: e.value for e in init.external_data}
        total += int(meta.get("length", 0)) if meta else len(init.raw_data)
    return total


def _watch(proc: subprocess.Popen, cap_bytes: int, seen: dict) -> None:
    """Kill the build if its RSS passes the cap (other work shares this machine's RAM)."""
    try:
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            rss = ps.memory_info().rss
            seen["max"] = max(seen.get("max", 0), rss)
            if rss > cap_bytes:
                seen["killed"] = rss
                proc.kill()
                return
            time.sleep(0.1)
    except psutil.NoSuchProcess:
        return


def _build(export_dir: Path, target: str, args) -> tuple[dict | None, str]:
    """-> (manifest dict or None, status)."""
    cmd = [
        sys.executable,
        "-c",
        BUILD,
        str(export_dir),
        target,
        str(args.max_batch),
        str(args.max_seq),
        args.profiles,
    ]
    cap_bytes, timeout = args.cap_bytes, args.timeout
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[str, int] = {}
    watchdog = threading.Thread(target=_watch, args=(proc, cap_bytes, seen), daemon=True)
    watchdog.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return (
            None,
            f"build did not finish within {timeout:.0f} s (peak RSS so far {seen.get('max', 0) / GIB:.1f} GiB)",
        )
    watchdog.join()
    if "killed" in seen:
        return (
            None,
            f"stopped at {seen['killed'] / GIB:.1f} GiB RSS, above the {cap_bytes / GIB:.1f} GiB cap for this machine",
        )
    if proc.returncode != 0:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        return None, (lines[-1] if lines else f"build exited with {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1]), "ok"


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def measure(preset: str, dtype: str, targets: list[str], work: Path, args) -> list[Row]:
    quant = _quant_name(args)
    try:
        export_dir, export_s = _export(preset, dtype, work, args)
    except Exception as e:  # report, never raise: one broken preset must not hide the others
        return [
            Row(preset, dtype, quant, t, None, None, None, None, None, None, f"export failed: {e}")
            for t in targets
        ]
    weights = decoder_weight_bytes(export_dir)
    rows = []
    for target in targets:
        manifest, status = _build(export_dir, target, args)
        if manifest is None:
            rows.append(
                Row(preset, dtype, quant, target, weights, _round(export_s), None, None, None, None, status)
            )
            continue
        mem = manifest["memory"]
        rows.append(
            Row(
                preset,
                dtype,
                quant,
                target,
                weights,
                _round(export_s),
                manifest["build_seconds"],
                mem["peak_rss_bytes"],
                mem["peak_rss_bytes"] - mem["start_rss_bytes"],
                manifest["files"]["decoder.engine"]["bytes"],
                "ok",
            )
        )
    if not args.keep:
        shutil.rmtree(export_dir, ignore_errors=True)
    return rows


# ----- the full-size preset ---------------------------------------------------------------------


def full_preflight(preset: str, dtype: str, work: Path, cap_bytes: int) -> str | None:
    """Why the full-size preset cannot even be attempted here (disk for checkpoint + export), or None."""
    from gemma4_compile.model.presets import PRESETS

    spec = PRESETS[preset]
    params = _param_count(spec)
    need = params * 2 * 2 + 4 * GIB  # bf16 checkpoint + export weights, plus slack
    free = shutil.disk_usage(work).free
    if free < need:
        return (
            f"needs ~{need / GIB:.0f} GiB of disk for a {params / 1e9:.2f}B-parameter checkpoint and its export, "
            f"{free / GIB:.0f} GiB free"
        )
    if cap_bytes < 4 * GIB:
        return f"only {cap_bytes / GIB:.1f} GiB of RAM may be used here"
    return None


def _param_count(spec) -> int:
    import torch

    from gemma4_compile.model.model import Gemma4TextModel

    with torch.device("meta"):
        model = Gemma4TextModel(spec)
    return sum(p.numel() for p in model.parameters())


# ----- report -----------------------------------------------------------------------------------


def _fmt(value, scale: float = 1.0, unit: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}{unit}"


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'preset':<14}{'dtype':<6}{'quant':<24}{'target':<8}{'dec. weights':>13}{'export':>9}{'build':>9}{'peak RSS':>10}"
        f"{'RSS growth':>12}{'engine':>11}  status"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.preset:<14}{r.dtype:<6}{r.quant:<24}{r.target:<8}{_fmt(r.decoder_weight_bytes, 1 << 20, ' MiB'):>13}"
            f"{_fmt(r.export_s, 1, ' s'):>9}{_fmt(r.build_s, 1, ' s'):>9}{_fmt(r.peak_rss_bytes, GIB, ' GiB', 2):>10}"
            f"{_fmt(r.rss_growth_bytes, GIB, ' GiB', 2):>12}{_fmt(r.engine_bytes, 1 << 20, ' MiB'):>11}  {r.status}"
        )


def _environment() -> dict:
    from gemma4_compile.engines import installed_flavours

    return {
        "tensorrt": [f.title for f in installed_flavours()],
        "cpus": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
        "python": sys.version.split()[0],
    }


def main(argv: list[str] | None = None) -> int:
    from gemma4_compile.model.presets import TINY_PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(TINY_PRESETS))
    parser.add_argument("--targets", default="sm89")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--max-batch", type=int, default=1)
    parser.add_argument("--max-seq", type=int, default=256)
    parser.add_argument("--profiles", default="prefill,decode", help="optimization profiles per engine")
    parser.add_argument("--full", default="", help="full-size presets to try as well, e.g. e2b")
    parser.add_argument("--quant", default="none", help="export --quant (int4, int8, fp8, nvfp4)")
    parser.add_argument("--block-size", type=int, default=None, help="export --block-size")
    parser.add_argument(
        "--quant-override",
        action="append",
        default=[],
        help="export --quant-override ROLE=FORMAT (repeatable)",
    )
    parser.add_argument(
        "--cap-gib", type=float, default=None, help="RSS cap per build (default: 85%% of free RAM)"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per build")
    parser.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep checkpoints and exports")
    args = parser.parse_args(argv)
    available = psutil.virtual_memory().available
    args.cap_bytes = int(args.cap_gib * GIB) if args.cap_gib else int(available * 0.85)
    work = Path(args.work or tempfile.mkdtemp(prefix="engine-build-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    targets = [t for t in args.targets.split(",") if t]
    rows: list[Row] = []
    for preset in [p for p in args.presets.split(",") if p]:
        rows += measure(preset, args.dtype, targets, work, args)
    for preset in [p for p in args.full.split(",") if p]:
        reason = full_preflight(preset, args.dtype, work, args.cap_bytes)
        if reason:
            rows += [
                Row(
                    preset,
                    args.dtype,
                    _quant_name(args),
                    t,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    f"not attempted: {reason}",
                )
                for t in targets
            ]
        else:
            rows += measure(preset, args.dtype, targets, work, args)
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    print(
        json.dumps(
            {
                "benchmark": "engine_build",
                "environment": _environment(),
                "max_batch": args.max_batch,
                "max_seq": args.max_seq,
                "profiles": args.profiles,
                "quant": _quant_name(args),
                "cap_bytes": args.cap_bytes,
                "rows": [asdict(r) for r in rows],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
