"""Weight-only quantization on onnxruntime CPU: export size and time, peak RSS, decode tokens/s, and quality
against the fp32 export, for fp32 / int8 / int4 exports of one random mid-size E2B-like checkpoint, in one run.

    python benchmarks/quant_memory.py [--prompt 128] [--steps 32] [--threads 2]

Each export decodes in its own process, so VmHWM (the process's peak RSS: interpreter, onnxruntime, weights,
caches) is that export's alone. Quality is reported, not judged: on random weights even correct quantization
moves logits a lot; `validate` against the fake-quant reference is the correctness check.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import MID_E2B, report

from gemma4_compile.export import export_checkpoint
from gemma4_compile.model.checkpoint import write_random_checkpoint
from gemma4_compile.quant.formats import QuantRequest

VARIANTS = {  # name -> --quant request (None: the fp32 export)
    "fp32": None,
    "int8 b32": QuantRequest("int8", 32),
    "int4 b32": QuantRequest("int4", 32),
    "int4 b128": QuantRequest("int4", 128),
    "int4 b32 acc4": QuantRequest("int4", 32, accuracy_level=4),
}

# Runs in a fresh interpreter: decode, then report VmHWM and timings as one JSON line; logits go to a .npy file.
CHILD = r"""
import json, sys, time
import numpy as np
from gemma4_compile.runners.ort import OrtRunner
export, prompt, steps, threads, logits_file = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
t0 = time.perf_counter()
runner = OrtRunner(export, threads=threads)
session_s = time.perf_counter() - t0
ids = np.random.default_rng(0).integers(3, runner.spec.vocab_size, (1, prompt))
np.save(logits_file, runner.logits(ids)[0])  # prefill logits of every prompt position (quality)
runner.generate(ids, 2)  # warm-up
t0 = time.perf_counter()
runner.generate(ids, steps)
decode_s = time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"session_s": session_s, "generate_s": decode_s, "vmhwm_mib": hwm / 1024}))
"""


def _decode(export: Path, args: argparse.Namespace, logits_file: Path) -> dict:
    cmd = [sys.executable, "-c", CHILD, str(export), str(args.prompt), str(args.steps), str(args.threads)]
    out = subprocess.run([*cmd, str(logits_file)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _quality(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """KL(ref || out) in nats (mean over positions), top-1 agreement, relative logit error."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(out)
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    top1 = float((ref.argmax(-1) == out.argmax(-1)).mean())
    rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    return {"kl": kl, "top1": top1, "rel_err": rel}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        write_random_checkpoint(MID_E2B, ckpt, dtype=torch.float32)
        logits = {}
        for name, request in VARIANTS.items():
            out = Path(tmp) / name.replace(" ", "-")
            t0 = time.perf_counter()
            export_checkpoint(ckpt, out, max_seq_len=args.prompt + args.steps + 16, quant=request)
            export_s = time.perf_counter() - t0
            r = _decode(out, args, Path(tmp) / f"{out.name}.npy")
            logits[name] = np.load(Path(tmp) / f"{out.name}.npy")
            decoder_mib = (out / "weights.data").stat().st_size / 2**20
            results[name] = {"export_s": export_s, "weights_mib": decoder_mib, **r}
            results[name]["tokens_per_s"] = args.steps / r["generate_s"]
        for name, r in results.items():
            r.update(_quality(logits["fp32"], logits[name]))
    base = results["fp32"]
    rows = [
        [
            name,
            r["weights_mib"],
            r["weights_mib"] / base["weights_mib"],
            r["export_s"],
            r["vmhwm_mib"],
            r["tokens_per_s"],
            r["tokens_per_s"] / base["tokens_per_s"],
            r["kl"],
            r["top1"],
        ]
        for name, r in results.items()
    ]
    report(
        f"weight-only quant, ORT CPU, mid E2B-like random, {args.threads} threads: "
        f"{args.steps} tokens after {args.prompt} (x = vs fp32; RSS = VmHWM)",
        ["export", "MiB", "size x", "export s", "RSS MiB", "tok/s", "speed x", "KL", "top-1"],
        rows,
        {"benchmark": "quant_memory", "prompt": args.prompt, "steps": args.steps, "results": results},
    )


if __name__ == "__main__":
    main()
