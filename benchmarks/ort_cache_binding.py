"""What reused IO bindings save: OrtRunner decode with caches double-buffered in bindings built once (the
default) against numpy feeds (`io_binding=False`: presents come back as new arrays every step), alternating in
one run.

    python benchmarks/ort_cache_binding.py [--prompt 512] [--steps 64] [--rounds 3] [--export DIR]

Mid-size E2B-like config, fp32. Prints a table (decode tokens/s and the ratio bound / numpy, plus session start)
and a JSON line. Greedy tokens must be identical between the two modes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import MID_E2B, report

from gemma4_compile.runners.ort import OrtRunner


def decode_seconds(runner: OrtRunner, ids: np.ndarray, steps: int) -> tuple[float, np.ndarray]:
    """Seconds for `steps` greedy decode steps after the prefill (prefill excluded), and the tokens."""
    B = ids.shape[0]
    state = runner.start(B, ids.shape[1] + steps)
    logits = runner.step(state, ids, np.full(B, ids.shape[1]))
    tokens, one = [], np.ones(B, np.int64)
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        tokens.append(nxt)
        logits = runner.step(state, nxt, one)
    return time.perf_counter() - t0, np.concatenate(tokens, axis=1)


def make_export(tmp: Path, max_len: int) -> Path:
    import torch

    from gemma4_compile.export import export_checkpoint
    from gemma4_compile.model.checkpoint import write_random_checkpoint

    ckpt, out = tmp / "ckpt", tmp / "export"
    write_random_checkpoint(MID_E2B, ckpt, dtype=torch.float32, multimodal=False)
    export_checkpoint(ckpt, out, max_seq_len=max_len)
    return out


def compare(runners: dict[str, OrtRunner], batch: int, args: argparse.Namespace) -> dict:
    ids = np.random.default_rng(batch).integers(3, MID_E2B.vocab_size, (batch, args.prompt))
    best = dict.fromkeys(runners, float("inf"))
    tokens = {}
    for _ in range(args.rounds):  # alternate, keep each mode's best
        for name, runner in runners.items():
            seconds, tokens[name] = decode_seconds(runner, ids, args.steps)
            best[name] = min(best[name], seconds)
    tps = {k: batch * args.steps / v for k, v in best.items()}
    same = bool((tokens["bound"] == tokens["numpy"]).all())
    return {"tokens_per_s": tps, "ratio_bound_over_numpy": tps["bound"] / tps["numpy"], "same_tokens": same}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--export", type=Path, help="an fp32 export of the mid E2B-like config to reuse")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export = args.export or make_export(Path(tmp), args.prompt + args.steps + 16)
        runners = {
            "numpy": OrtRunner(export, threads=args.threads, io_binding=False),
            "bound": OrtRunner(export, threads=args.threads),
        }
        payload = {f"batch{b}": compare(runners, b, args) for b in args.batches}
    rows = [
        [
            b,
            p["tokens_per_s"]["numpy"],
            p["tokens_per_s"]["bound"],
            p["ratio_bound_over_numpy"],
            p["same_tokens"],
        ]
        for b, p in zip(args.batches, payload.values())
    ]
    report(
        f"OrtRunner decode, {args.steps} steps after a {args.prompt}-token prompt (mid-size E2B-like, fp32, "
        f"{args.threads} threads, best of {args.rounds})",
        ["batch", "numpy-feed tokens/s", "bound tokens/s", "bound / numpy", "same tokens"],
        rows,
        {"benchmark": "ort_cache_binding", "prompt": args.prompt, "steps": args.steps, **payload},
    )


if __name__ == "__main__":
    main()
