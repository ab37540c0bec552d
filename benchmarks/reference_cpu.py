"""Our PyTorch reference vs transformers eager on the CPU: prefill and decode-step time, mid-size config.

    python benchmarks/reference_cpu.py [--prompt 256] [--steps 32]

Prints a table with ratios (transformers time / ours, >1 means ours is faster) and a JSON line.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from common import MID_E2B, report, timeit

from gemma4_compile.model.checkpoint import write_random_checkpoint
from gemma4_compile.validate.reference import HFRunner, TorchRunner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        write_random_checkpoint(MID_E2B, tmp, dtype=torch.float32)
        runners = {"ours": TorchRunner(tmp), "transformers": HFRunner(tmp)}
        ids = np.random.default_rng(0).integers(3, MID_E2B.vocab_size, (1, args.prompt))
        results = {}
        for name, r in runners.items():
            prefill = timeit(lambda r=r: r.logits(ids), repeat=5)
            state = r.start(1, args.prompt + args.steps + 8)
            r.step(state, ids, np.array([args.prompt]))
            one = np.ones(1, dtype=np.int64)
            decode = timeit(
                lambda r=r, s=state, one=one: r.step(s, ids[:, :1], one), repeat=args.steps, warmup=2
            )
            results[name] = {"prefill_s": prefill, "decode_step_s": decode}
    o, t = results["ours"], results["transformers"]
    rows = [
        [
            "prefill p50 (ms)",
            o["prefill_s"]["p50"] * 1e3,
            t["prefill_s"]["p50"] * 1e3,
            t["prefill_s"]["p50"] / o["prefill_s"]["p50"],
        ],
        [
            "decode step p50 (ms)",
            o["decode_step_s"]["p50"] * 1e3,
            t["decode_step_s"]["p50"] * 1e3,
            t["decode_step_s"]["p50"] / o["decode_step_s"]["p50"],
        ],
    ]
    report(
        f"reference on CPU: mid-size E2B-like, prompt {args.prompt}, {args.threads} threads",
        ["metric", "ours", "transformers eager", "ratio (hf/ours)"],
        rows,
        {
            "benchmark": "reference_cpu",
            "prompt": args.prompt,
            "threads": args.threads,
            **results,
            "prefill_ratio": rows[0][3],
            "decode_ratio": rows[1][3],
        },
    )


if __name__ == "__main__":
    main()
