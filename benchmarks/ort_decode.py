"""Greedy decode of 64 tokens: OrtRunner (exported graph) vs transformers eager with its cache, one run.

    python benchmarks/ort_decode.py [--prompt 128] [--steps 64]

Also times the gqa-lowered export and our PyTorch reference. Prints a table with ratios (transformers / backend) and a JSON line.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import MID_E2B, report

from gemma4_compile.export import export_checkpoint
from gemma4_compile.model.checkpoint import write_random_checkpoint
from gemma4_compile.runners.ort import OrtRunner
from gemma4_compile.validate.reference import HFRunner, TorchRunner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, out, gqa = Path(tmp) / "ckpt", Path(tmp) / "export", Path(tmp) / "export-gqa"
        write_random_checkpoint(MID_E2B, ckpt, dtype=torch.float32)
        export_checkpoint(ckpt, out, max_seq_len=args.prompt + args.steps + 16)
        export_checkpoint(ckpt, gqa, max_seq_len=args.prompt + args.steps + 16, lowering="gqa")
        runners = {
            "ort": OrtRunner(out, threads=args.threads),
            "ort (--lowering gqa)": OrtRunner(gqa, threads=args.threads),
            "ours (torch)": TorchRunner(ckpt),
            "transformers eager": HFRunner(ckpt),
        }
        ids = np.random.default_rng(0).integers(3, MID_E2B.vocab_size, (1, args.prompt))
        times, tokens = {}, {}
        for name, r in runners.items():
            r.generate(ids, 4)  # warm-up
            t0 = time.perf_counter()
            tokens[name] = r.generate(ids, args.steps)
            times[name] = time.perf_counter() - t0
    hf = times["transformers eager"]
    same = {k: bool((v == tokens["transformers eager"]).all()) for k, v in tokens.items()}
    rows = [[k, v, args.steps / v, hf / v, same[k]] for k, v in times.items()]
    report(
        f"greedy decode, {args.steps} tokens after a {args.prompt}-token prompt (mid-size E2B-like, CPU)",
        ["backend", "total s", "tokens/s", "speed-up vs transformers", "same tokens"],
        rows,
        {
            "benchmark": "ort_decode",
            "prompt": args.prompt,
            "steps": args.steps,
            "seconds": times,
            "speedup_vs_transformers": {k: hf / v for k, v in times.items()},
            "same_tokens": same,
        },
    )


if __name__ == "__main__":
    main()
