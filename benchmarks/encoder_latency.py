"""Encoder latency and the multimodal time to first token at full tower size, beside torch and transformers.

    python benchmarks/encoder_latency.py [--workdir /tmp/g4enc] [--budgets 70 280] [--seconds 1 10]

Runs `gemma4_compile.validate.bench` (the same code as `gemma4-compile bench`) on an fp32 export of a random
checkpoint holding the full-size E2B vision tower (16 x 768) and audio tower (12 x 1024) over the tiny-e2b
text model: the towers' cost does not depend on the text model, whose only trace here is the projectors'
output width (tiny instead of 1536: under 0.5% of a tower's FLOPs). Rows: one image per budget and one clip
per length through onnxruntime (CPU), our torch towers and transformers eager, the same arrays for each, and
the image+audio+text TTFT of onnxruntime and transformers. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import torch
from common import report

from gemma4_compile.export import export_checkpoint
from gemma4_compile.model.checkpoint import write_random_checkpoint
from gemma4_compile.model.presets import AUDIO_PRESETS, PRESETS, VISION_PRESETS
from gemma4_compile.validate.bench import BenchConfig, bench


def tower_checkpoint(path: Path) -> None:
    text = PRESETS["tiny-e2b"]
    width = {"text_hidden_size": text.hidden_size}
    vision = dataclasses.replace(VISION_PRESETS["e2b"], **width)
    audio = dataclasses.replace(AUDIO_PRESETS["e2b"], **width)
    write_random_checkpoint(text, path, dtype=torch.float32, vision=vision, audio=audio)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/g4enc")
    ap.add_argument("--budgets", type=int, nargs="+", default=[70, 280])
    ap.add_argument("--seconds", type=float, nargs="+", default=[1.0, 10.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    try:
        tower_checkpoint(work / "ckpt")
        export_checkpoint(work / "ckpt", work / "out", dtype="fp32", max_seq_len=512)
        config = BenchConfig(
            context_lengths=(16,), batch_sizes=(1,), decode_steps=2, prefill_repeats=args.repeats,
            image_budgets=tuple(args.budgets), audio_seconds=tuple(args.seconds),
        )  # fmt: skip
        result = bench(work / "out", config=config, out_dir=work, memory=False)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    media = [r for r in result.rows if r.media]
    rows = [
        [r.backend, r.phase, r.budget or "–", r.audio_s or "–", r.context, r.p50_ms, r.p90_ms,
         r.ms_per_audio_s or "–", r.vs_hf or "–", r.vs_torch or "–", "–" if r.first_token is None else r.first_token]
        for r in media
    ]  # fmt: skip
    payload = {"benchmark": "encoder_latency", "environment": result.environment}
    payload["rows"] = [result.to_dict()["rows"][i] for i, r in enumerate(result.rows) if r.media]
    report(
        "full-size E2B towers, fp32, CPU",
        ["backend", "phase", "budget", "audio s", "tokens", "p50 ms", "p90 ms", "ms/audio s", "× hf", "× torch",
         "first token"],
        rows,
        payload,
    )  # fmt: skip


if __name__ == "__main__":
    main()
