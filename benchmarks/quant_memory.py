"""Weight-only quantization on onnxruntime CPU: export size and time, peak RSS, decode tokens/s, and quality
against the fp32 export, for fp32 / int8 / int4 exports of one random mid-size E2B-like checkpoint, in one run.

    python benchmarks/quant_memory.py [--prompt 128] [--steps 32] [--threads 2] [--repeat 3]
    python benchmarks/quant_memory.py --edge CKPT [--prompt 512] [--steps 64] [--fp32]

`--edge CKPT`: the full-size E2B (`gemma4-compile init-random --preset e2b --text-only -o CKPT`) exported with
the edge recipe (EDGE below), decoding `--steps` tokens after a `--prompt`-token prompt the way `generate
--low-memory` does (runtime/backend.py: prefill in chunks of 8, onnxruntime's CPU arena off, freed buffers
returned to the system), with the embedding and PLE rows read from weights.data by row (runners/rows.py);
`--fp32` adds the fp32 export (17.6 GB on disk) in the same run. bf16 exports do not run on
onnxruntime's CPU provider (no bf16 MatMul), so there is no bf16 row.

Each export decodes in its own process, so VmHWM (the process's peak RSS: interpreter, onnxruntime, weights,
caches) is that export's alone. Quality is reported, not judged: on random weights even correct quantization
moves logits a lot; `validate` against the fake-quant reference is the correctness check.
"""

from __future__ import annotations

import argparse
import dataclasses
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
export, logits_file = sys.argv[1], sys.argv[5]
prompt, steps, threads, repeat = map(int, (*sys.argv[2:5], sys.argv[6]))
t0 = time.perf_counter()
runner = OrtRunner(export, threads=threads)
session_s = time.perf_counter() - t0
ids = np.random.default_rng(0).integers(3, runner.spec.vocab_size, (1, prompt))
np.save(logits_file, runner.logits(ids)[0])  # prefill logits of every prompt position (quality)
runner.generate(ids, 2)  # warm-up
times = []
for _ in range(repeat):  # best of `repeat`: one timing on a shared CPU swings by 2x
    t0 = time.perf_counter()
    runner.generate(ids, steps)
    times.append(time.perf_counter() - t0)
decode_s = min(times)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"session_s": session_s, "generate_s": decode_s, "vmhwm_mib": hwm / 1024}))
"""


# The edge recipe: int4 MatMuls in blocks of 128, the tied LM head int4 too, the PLE projections int8; the
# embedding and PLE tables are int8 rows by default. Blocks of 64 cost 68 MiB more fp32 scales on E2B.
EDGE = QuantRequest("int4", 128, overrides=(("lm_head", "int4"), ("ple_proj", "int8")))
EDGE_FAST = dataclasses.replace(EDGE, accuracy_level=4)  # int8 activations: faster, not exact
# A fresh interpreter per export, through `generate --low-memory`'s own path (runtime/backend.py: no onnxruntime
# arena, freed buffers returned to the system, prefill in chunks): VmHWM and timings as one JSON line.
EDGE_CHILD = r"""
import json, sys, time
import numpy as np
from gemma4_compile.runtime.backend import LOW_MEMORY_PREFILL, open_runner
from gemma4_compile.runtime.generate import generate
export, prompt, steps, threads = sys.argv[1], *map(int, sys.argv[2:5])
hwm = lambda: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
t0 = time.perf_counter()
runner = open_runner(export, threads=threads, low_memory=True)
session_s, session_hwm = time.perf_counter() - t0, hwm()
ids = np.random.default_rng(0).integers(3, runner.spec.vocab_size, prompt).tolist()
r = generate(runner, ids, steps, prefill_chunk=LOW_MEMORY_PREFILL)
print(json.dumps({"session_s": session_s, "prefill_s": r.ttft_s, "decode_tok_s": r.tokens_per_s,
                  "tokens": r.tokens, "session_vmhwm_mib": session_hwm, "vmhwm_mib": hwm(),
                  "prefill_chunk": LOW_MEMORY_PREFILL}))
"""


def _edge(args: argparse.Namespace) -> None:
    """The full-size E2B with the edge recipe (and fp32 with --fp32): export, then decode in a fresh process."""
    variants = {"int4 edge": EDGE, "int4 edge acc4": EDGE_FAST, **({"fp32": None} if args.fp32 else {})}
    results = {}
    work = Path(args.workdir)
    for name, request in variants.items():
        out = work / name.replace(" ", "-")
        t0 = time.perf_counter()
        if not (out / "export.json").exists():
            export_checkpoint(args.edge, out, max_seq_len=args.prompt + args.steps, quant=request)
        export_s = time.perf_counter() - t0
        cmd = [
            sys.executable,
            "-c",
            EDGE_CHILD,
            str(out),
            str(args.prompt),
            str(args.steps),
            str(args.threads),
        ]
        run = subprocess.run(cmd, check=True, capture_output=True, text=True)
        r = json.loads(run.stdout.strip().splitlines()[-1])
        r["weights_mib"] = (out / "weights.data").stat().st_size / 2**20
        r["export_s"] = export_s
        results[name] = r
    rows = [
        [
            name,
            r["weights_mib"],
            r["session_vmhwm_mib"],
            r["vmhwm_mib"],
            r["vmhwm_mib"] * 2**20 / 1e9,
            args.prompt / r["prefill_s"],
            r["decode_tok_s"],
        ]
        for name, r in results.items()
    ]
    report(
        f"full-size E2B (random weights) on ORT CPU, {args.threads} threads: {args.steps} tokens after a "
        f"{args.prompt}-token prompt (generate --low-memory's path; rows read by row; RSS = VmHWM)",
        [
            "export",
            "weights MiB",
            "RSS after load MiB",
            "peak RSS MiB",
            "peak GB",
            "prefill tok/s",
            "decode tok/s",
        ],
        rows,
        {"benchmark": "quant_memory_edge", "prompt": args.prompt, "steps": args.steps, "results": results},
    )


def _decode(export: Path, args: argparse.Namespace, logits_file: Path) -> dict:
    cmd = [sys.executable, "-c", CHILD, str(export), str(args.prompt), str(args.steps), str(args.threads)]
    cmd += [str(logits_file), str(args.repeat)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
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
    ap.add_argument("--prompt", type=int, default=None, help="[default: 128; --edge 512]")
    ap.add_argument("--steps", type=int, default=None, help="[default: 32; --edge 64]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="generate timings per export (the best is kept)")
    ap.add_argument("--edge", type=Path, default=None, help="a full-size E2B checkpoint: the edge recipe")
    ap.add_argument("--fp32", action="store_true", help="--edge: the fp32 export too (17.6 GB on disk)")
    ap.add_argument("--workdir", default=tempfile.gettempdir(), help="--edge: where exports go (reused)")
    args = ap.parse_args()
    edge = args.edge is not None
    args.prompt = args.prompt or (512 if edge else 128)
    args.steps = args.steps or (64 if edge else 32)
    if edge:
        return _edge(args)
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
