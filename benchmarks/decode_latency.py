"""Prefill and decode-step latency by context length: torch eager vs transformers eager (and onnxruntime).

    python benchmarks/decode_latency.py [--preset tiny-e2b|mid-e2b] [--ort] [--threads 1]

Runs `gemma4_compile.validate.bench_runners` (the same code as `gemma4-compile bench`) on a random-weight
checkpoint; contexts default to W/2, W, 2W, 4W so decode runs past the sliding window. Prints a table
(p50/p90/p99 per row, ratio to torch eager) and one JSON line. Writes rows; never asserts.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import MID_E2B, report

from gemma4_compile.model.checkpoint import write_random_checkpoint
from gemma4_compile.model.presets import PRESETS, TINY_PRESETS
from gemma4_compile.validate import BenchConfig, HFRunner, TorchRunner, bench_runners

SPECS = {**{name: PRESETS[name] for name in TINY_PRESETS}, "mid-e2b": MID_E2B}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-e2b", choices=sorted(SPECS))
    p.add_argument("--ort", action="store_true", help="also export to ONNX and time onnxruntime")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--contexts", type=int, nargs="*", help="context lengths [default: W/2 W 2W 4W]")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    p.add_argument("--steps", type=int, default=10, help="timed decode steps per row")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    spec = SPECS[args.preset]
    config = BenchConfig(tuple(args.contexts) if args.contexts else None, tuple(args.batches), args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, export = Path(tmp) / "ckpt", Path(tmp) / "export"
        write_random_checkpoint(spec, ckpt, seed=0, dtype=torch.float32)
        runners = {"torch": lambda: TorchRunner(ckpt), "hf": lambda: HFRunner(ckpt)}
        if args.ort:
            from gemma4_compile.export import export_checkpoint
            from gemma4_compile.validate import OrtRunner

            max_len = max(config.contexts(spec, spec.max_position_embeddings)) + args.steps + 8
            export_checkpoint(ckpt, export, max_seq_len=max_len)
            runners["ort"] = lambda: OrtRunner(export)
        result = bench_runners(runners, spec, config)
    rows = [
        [
            r.backend,
            r.phase,
            r.batch,
            r.context,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.tokens_per_s,
            r.vs_torch or "-",
        ]
        for r in result.rows
    ]
    columns = ["backend", "phase", "batch", "context", "p50 ms", "p90 ms", "p99 ms", "tokens/s", "× torch"]
    title = f"{args.preset}: latency by context (W = {spec.sliding_window}, torch threads {args.threads})"
    report(title, columns, rows, {"benchmark": "decode_latency", "preset": args.preset, **result.to_dict()})


if __name__ == "__main__":
    main()
