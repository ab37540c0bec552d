"""What binding the caches saves: OrtRunner decode with presents written into preallocated buffers (IO binding,
the default) against plain `session.run` (presents copied out to numpy every step), alternating in one run.

    python benchmarks/ort_cache_binding.py [--prompt 512] [--steps 64] [--rounds 3]

Mid-size E2B-like config, fp32, batch 1 and 4. Prints a table (decode tokens/s and the ratio bound / copied) and
a JSON line. Greedy tokens must be identical between the two modes.
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


def decode_seconds(runner: OrtRunner, ids: np.ndarray, steps: int) -> tuple[float, np.ndarray]:
    """Seconds for `steps` greedy decode steps after the prefill (prefill excluded), and the tokens."""
    state = runner.start(ids.shape[0], ids.shape[1] + steps)
    logits = runner.step(state, ids)
    tokens = []
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        tokens.append(nxt)
        logits = runner.step(state, nxt)
    return time.perf_counter() - t0, np.concatenate(tokens, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, out = Path(tmp) / "ckpt", Path(tmp) / "export"
        write_random_checkpoint(MID_E2B, ckpt, dtype=torch.float32)
        export_checkpoint(ckpt, out, max_seq_len=args.prompt + args.steps + 16)
        bound, copied = OrtRunner(out, threads=args.threads), OrtRunner(out, threads=args.threads)
        copied.bind_caches = False
        rows, payload = [], {}
        for batch in (1, 4):
            ids = np.random.default_rng(batch).integers(3, MID_E2B.vocab_size, (batch, args.prompt))
            best = {"bound": float("inf"), "copied": float("inf")}
            tokens = {}
            for _ in range(args.rounds):  # alternate, keep each mode's best
                for name, runner in (("bound", bound), ("copied", copied)):
                    seconds, tokens[name] = decode_seconds(runner, ids, args.steps)
                    best[name] = min(best[name], seconds)
            same = bool((tokens["bound"] == tokens["copied"]).all())
            tps = {k: batch * args.steps / v for k, v in best.items()}
            rows.append([batch, tps["copied"], tps["bound"], best["copied"] / best["bound"], same])
            payload[f"batch{batch}"] = {
                "tokens_per_s": tps,
                "ratio_bound_over_copied": tps["bound"] / tps["copied"],
                "same_tokens": same,
            }
    report(
        f"OrtRunner decode, {args.steps} steps after a {args.prompt}-token prompt (mid-size E2B-like, fp32, "
        f"{args.threads} threads, best of {args.rounds})",
        ["batch", "copied tokens/s", "bound tokens/s", "bound / copied", "same tokens"],
        rows,
        {"benchmark": "ort_cache_binding", "prompt": args.prompt, "steps": args.steps, **payload},
    )


if __name__ == "__main__":
    main()
