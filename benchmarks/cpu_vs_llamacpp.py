"""Our onnxruntime exports vs llama.cpp on the CPU, same checkpoints, same prompt ids, same threads (issue #18).

    pip install -r benchmarks/requirements-llamacpp.txt      # optional: builds llama.cpp from source
    python benchmarks/cpu_vs_llamacpp.py --llama-src DIR [--configs e2b moe dense] [--repeat 3]
        [--variants fp32] [--baseline OLD_WORK] [--plain]

DIR is the llama.cpp tree that llama-cpp-python vendors (`vendor/llama.cpp` of its sdist:
`pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36`), for `convert_hf_to_gguf.py`.

For each mid-size config (benchmarks/common.py) it writes a random fp32 checkpoint, exports it (fp32, int4),
converts it to GGUF (f32, f16, q8_0, q4_0), and then times a greedy decode (prompt, then `--steps` tokens) of
each side in a process of its own (peak RSS is that side's alone), alternating the sides `--repeat` times and
keeping the best. `--variants` limits our variants (and llama.cpp's to their pairs). `--baseline OLD_WORK`
times `OLD_WORK/<config>/onnx-fp32` (written by an earlier version, e.g. before a change to an op body) as
ours variant `fp32-base` beside every fp32 cell, so before and after alternate within one run. Greedy tokens
of row 0 are compared with transformers (fp32) or, for int4, with our PyTorch model on the same dequantized
weights (the validate gate); llama.cpp's are reported as they are. `--plain` also times the same fp32 export
with the runner's graph rewrite off (`OrtRunner(share_shapes=False)`) as `fp32-plain` beside every fp32 cell;
`--no-kernels` times each of our variants also with `OrtRunner(kernels=False)` as `<variant>-nokern`.
`--variants ... int4-acc4-ple4` adds the precision q4_0 has on E2B: int4-acc4 with the PLE projections at 4 bits
(`--quant-override ple_proj=int4`; ours keep them fp32 by default); its greedy tokens are compared with int4's
reference.
Our rows' `kernels` in the JSON says which of our onnxruntime CPU kernels ran (runners/ort_kernels: build them
first with `python -m gemma4_compile.runners.ort_kernels`) or why none did. Prints a table and one JSON line;
exits 1 with one line when llama_cpp is not installed.

llama.cpp's OpenMP threads wait at its barriers as `--omp-wait-policy` says (OMP_WAIT_POLICY, default ACTIVE:
spinning). On a CPU shared with other jobs, spinning threads collapse (2-thread decode 10-20x slower than 1
thread): there PASSIVE, with `--no-ort-spin` for onnxruntime, is the fairer setting and the 1-thread rows are
the ones to trust. On an idle machine PASSIVE is what collapses instead (mid MoE q4_0, 2 threads: 72 tok/s
PASSIVE, 347 ACTIVE; benchmarks/RESULTS.md, seventh session).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from common import MID_SPECS, report

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Cell:
    """One timed run: which model file, which engine, batch and threads."""

    side: str  # "ours" | "llama"
    variant: str  # fp32 / int4 / int4-acc4 | f32 / f16 / q8_0 / q4_0
    batch: int
    threads: int


# ----- worker: runs in its own process ------------------------------------------------------------------
def _vmhwm_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def _ours(
    path: Path,
    batch: int,
    max_len: int,
    threads: int,
    spin: bool = True,
    share_shapes: bool = True,
    kernels: bool = True,
):
    import onnxruntime as ort

    from gemma4_compile.runners.ort import OrtRunner

    options = ort.SessionOptions()
    if not spin:  # onnxruntime's counterpart of OMP_WAIT_POLICY=PASSIVE
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    runner = OrtRunner(path, threads=threads, options=options, share_shapes=share_shapes, kernels=kernels)
    holder = {}

    def reset() -> None:
        holder["state"] = runner.start(batch, max_len)

    def step(ids: np.ndarray, start: int) -> np.ndarray:
        seq = np.full(ids.shape[0], ids.shape[1], dtype=np.int64)
        return runner.step(holder["state"], ids, seq)[:, -1]

    return reset, step, {"kernels": runner.kernels, "huge_pages": runner.huge_pages}


def _llama(path: Path, batch: int, max_len: int, threads: int, f32_cache: bool):
    from llamacpp_side import LlamaDecoder

    dec = LlamaDecoder(path, batch, max_len, threads, f32_cache)
    return dec.reset, dec.step


def greedy(reset, step, ids: np.ndarray, steps: int) -> dict:
    """Prefill `ids`, then steps-1 one-token calls -> tokens [B, steps] and the two times."""
    reset()
    t0 = time.perf_counter()
    last = step(ids, 0)
    prefill = time.perf_counter() - t0
    tokens = [last.argmax(-1)]
    t0 = time.perf_counter()
    for i in range(steps - 1):
        last = step(tokens[-1][:, None].astype(np.int64), ids.shape[1] + i)
        tokens.append(last.argmax(-1))
    decode = time.perf_counter() - t0
    return {"prefill_s": prefill, "decode_s": decode, "tokens": np.stack(tokens, 1).tolist()}


def worker(job: dict) -> dict:
    ids = np.load(job["ids"])[: job["batch"]]
    t0 = time.perf_counter()
    args = (Path(job["path"]), job["batch"], ids.shape[1] + job["steps"], job["threads"])
    runner = {}  # ours: which of our onnxruntime CPU kernels ran, how much is on huge pages (or why not)
    if job["side"] == "ours":
        reset, step, runner = _ours(
            *args,
            spin=job.get("ort_spin", True),
            share_shapes=job["variant"] != PLAIN,
            kernels=not job["variant"].endswith(NOKERN),
        )
    else:
        reset, step = _llama(*args, job["variant"] == "f32")
    load = time.perf_counter() - t0
    # warm-up at the timed shape: first-call allocations at full size (onnxruntime's arena grows once: the first
    # 64-token prefill after an 8-token warm-up took 1.27x the next one), thread pools
    greedy(reset, step, ids, 3)
    out = greedy(reset, step, ids, job["steps"])
    return {**out, "load_s": load, "vmhwm_mib": _vmhwm_mib(), **runner}


def run_cell(cell: Cell, path: Path, ids_file: Path, args: argparse.Namespace) -> dict:
    job = {
        **asdict(cell),
        "path": str(path),
        "ids": str(ids_file),
        "steps": args.steps,
        "ort_spin": args.ort_spin,
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    # llama.cpp's OpenMP threads spin at every barrier by default; on a CPU shared with other jobs that turns
    # 2-thread decode 10-20x slower (measured here), so its best setting here is passive waiting
    env = {**os.environ, "OMP_WAIT_POLICY": args.omp_wait_policy} if cell.side == "llama" else None
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env=env)
    if done.returncode < 0:  # llama.cpp segfaults on some models: say so, not its last log line
        return {
            "error": f"worker killed by signal {-done.returncode} ({signal.Signals(-done.returncode).name})"
        }
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----- preparation: checkpoint, exports, GGUFs, reference tokens -------------------------------------
def prepare(name: str, work: Path, args: argparse.Namespace) -> dict[tuple[str, str], Path | str]:
    """-> {(side, variant): model path, or the one-line reason it could not be made}."""
    import torch

    from gemma4_compile.export import export_checkpoint
    from gemma4_compile.model.checkpoint import write_random_checkpoint
    from gemma4_compile.quant.formats import QuantRequest

    spec, root = MID_SPECS[name], work / name
    ckpt = root / "ckpt"
    if not ckpt.exists():
        write_random_checkpoint(spec, ckpt, dtype=torch.float32, multimodal=False)
    max_len = args.prompt + args.steps + 16
    exports: dict[str, QuantRequest | None] = {
        "fp32": None,
        "int4": QuantRequest("int4", 32),
        "int4-acc4": QuantRequest("int4", 32, accuracy_level=4),
        # q4_0's precision on E2B: its PLE projections at 4 bits too (ours keep them fp32 by default)
        PLE4: QuantRequest("int4", 32, accuracy_level=4, overrides=(("ple_proj", "int4"),)),
    }
    paths: dict[tuple[str, str], Path | str] = {}
    for variant, quant in exports.items():
        if variant not in args.variants:
            continue
        out = root / f"onnx-{variant}"
        paths["ours", variant] = _made(
            out, lambda o=out, q=quant: export_checkpoint(ckpt, o, max_seq_len=max_len, quant=q)
        )
    if args.baseline:
        base = args.baseline / name / "onnx-fp32"
        paths["ours", BASE] = base if base.is_dir() else f"--baseline: no export at {base}"
    if args.plain and "fp32" in args.variants:
        paths["ours", PLAIN] = paths["ours", "fp32"]
    if args.no_kernels:
        paths.update({("ours", v + NOKERN): paths["ours", v] for v in args.variants})
    paths.update(_ggufs(ckpt, spec, root, args))
    return paths


def _made(out: Path, make) -> Path | str:
    if out.exists():
        return out
    try:
        make()
        return out
    except Exception as e:  # a variant this config refuses (int4 MoE): reported, the rest still runs
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"


def _ggufs(ckpt: Path, spec, root: Path, args: argparse.Namespace) -> dict[tuple[str, str], Path | str]:
    from llamacpp_side import CONVERT_TYPES, conversion_dir, convert, quantize_q4_0

    src = conversion_dir(ckpt, spec, root / "gguf-src")
    paths: dict[tuple[str, str], Path | str] = {}
    for t in CONVERT_TYPES:
        out = root / f"model-{t}.gguf"
        paths["llama", t] = _made(out, lambda o=out, t=t: convert(src, args.llama_src, t, o))
    f32 = paths["llama", "f32"]
    q4 = root / "model-q4_0.gguf"
    paths["llama", "q4_0"] = (
        _made(q4, lambda: quantize_q4_0(f32, q4, args.threads)) if isinstance(f32, Path) else f32
    )
    return paths


def reference_tokens(name: str, work: Path, ids: np.ndarray, steps: int) -> dict[str, list]:
    """Row 0's greedy tokens: transformers (fp32 checkpoint) and our model on int4's dequantized weights."""
    from gemma4_compile.export.manifest import ExportManifest
    from gemma4_compile.quant.reference import apply_fake_quant
    from gemma4_compile.validate.reference import HFRunner, TorchRunner

    ckpt, int4 = work / name / "ckpt", work / name / "onnx-int4"
    refs = {"fp32": HFRunner(ckpt).generate(ids[:1], steps)[0].tolist()}
    if int4.exists():
        torch_ref = TorchRunner(ckpt)
        apply_fake_quant(torch_ref.model, ExportManifest.load(int4).quant, "fp32")
        refs["int4"] = torch_ref.generate(ids[:1], steps)[0].tolist()
    return refs


# ----- the comparison ------------------------------------------------------------------------------
VARIANTS = ["fp32", "int4", "int4-acc4"]  # ours, as --variants names them (the default set)
PLE4 = (
    "int4-acc4-ple4"  # opt-in: int4-acc4 with the PLE projections at 4 bits, as q4_0 stores them (E2B only)
)
LLAMA_VARIANTS = ("f32", "f16", "q8_0", "q4_0")
BASE = "fp32-base"  # --baseline's fp32 export
PLAIN = "fp32-plain"  # --plain: the fp32 export without the runner's shared-shape rewrite
NOKERN = "-nokern"  # --no-kernels: a variant's export with the runner's CPU kernels off
PAIRS = {
    "fp32": "f32",
    "int4": "q4_0",
    "int4-acc4": "q4_0",
    PLE4: "q4_0",
    BASE: "f32",
    PLAIN: "f32",
}  # ours -> llama.cpp, same precision


def cells(args: argparse.Namespace) -> list[Cell]:
    """Batch 1 at --threads for each variant (llama.cpp's: all, or the pairs of --variants), then the batch x
    threads grid at fp32 / f32; fp32-base (--baseline) goes beside every fp32 cell."""
    extra = [v for v, on in ((BASE, args.baseline), (PLAIN, args.plain)) if on and "fp32" in args.variants]
    suffixes = ("", NOKERN) if args.no_kernels else ("",)  # each variant beside its kernels-off twin
    ours = [v + suffix for v in args.variants for suffix in suffixes] + extra
    fp32 = [v for v in ("fp32", BASE, PLAIN) if v in ours]
    llama = LLAMA_VARIANTS if args.variants == VARIANTS else dict.fromkeys(PAIRS[v] for v in args.variants)
    out = [Cell("ours", v, 1, args.threads) for v in ours] + [
        Cell("llama", v, 1, args.threads) for v in llama
    ]
    for threads in args.thread_list if fp32 else ():
        for batch in args.batches:
            if (batch, threads) != (1, args.threads):
                out += [Cell("ours", v, batch, threads) for v in fp32] + [
                    Cell("llama", "f32", batch, threads)
                ]
    return out


def measure(cfg: str, paths: dict, ids_file: Path, args: argparse.Namespace) -> dict[Cell, dict]:
    """Every cell `--repeat` times, the cells interleaved (ours, llama, ours, ...) so load drifts hit both."""
    best: dict[Cell, dict] = {}
    todo = [c for c in cells(args) if isinstance(paths.get((c.side, c.variant)), Path)]
    for _ in range(args.repeat):
        for c in todo:
            r = run_cell(c, paths[c.side, c.variant], ids_file, args)
            if args.log:  # one line per run as it ends, so a long run that is stopped keeps what it measured
                with args.log.open("a") as f:
                    f.write(json.dumps({"config": cfg, **asdict(c), **r}) + "\n")
            if "error" in r:
                best.setdefault(c, r)
                continue
            old = best.get(c)
            best[c] = r if old is None or "error" in old else _best(old, r)
    return best


def _best(a: dict, b: dict) -> dict:
    return {
        **a,
        "prefill_s": min(a["prefill_s"], b["prefill_s"]),
        "decode_s": min(a["decode_s"], b["decode_s"]),
        "load_s": min(a["load_s"], b["load_s"]),
        "vmhwm_mib": max(a["vmhwm_mib"], b["vmhwm_mib"]),
    }


def _match(tokens: list[int], ref: list[int] | None) -> str:
    if ref is None:
        return "-"
    same = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), len(ref))
    return f"{same}/{len(ref)}"


def rows_for(cfg: str, results: dict[Cell, dict], refs: dict, args: argparse.Namespace) -> list[dict]:
    rows = []
    for c, r in results.items():
        row = {"config": cfg, **asdict(c)}
        if "error" in r:
            rows.append({**row, "error": r["error"]})
            continue
        ref = refs.get("int4" if c.variant.startswith("int4") else "fp32")
        decode_tps = c.batch * (args.steps - 1) / r["decode_s"]
        rows.append(
            {
                **row,
                "prefill_ms": 1000 * r["prefill_s"],
                "decode_tps": decode_tps,
                "load_s": r["load_s"],
                "rss_mib": r["vmhwm_mib"],
                "match": _match(r["tokens"][0], ref),
                "kernels": r.get("kernels"),
                "huge_pages": r.get("huge_pages"),
            }
        )
    return _with_ratios(rows)


def _with_ratios(rows: list[dict]) -> list[dict]:
    """decode ratio = ours tokens/s / llama.cpp's; prefill ratio = llama.cpp's time / ours (>1: ours faster)."""
    llama = {
        (r["variant"], r["batch"], r["threads"]): r for r in rows if r["side"] == "llama" and "error" not in r
    }
    for r in rows:
        other = llama.get((PAIRS.get(r["variant"].removesuffix(NOKERN)), r["batch"], r["threads"]))
        if r["side"] == "ours" and "error" not in r and other:
            r["vs"] = other["variant"]
            r["decode_ratio"] = r["decode_tps"] / other["decode_tps"]
            r["prefill_ratio"] = other["prefill_ms"] / r["prefill_ms"]
    return rows


COLUMNS = ["config", "side", "variant", "batch", "threads", "prefill ms", "decode tok/s", "decode ratio",
           "prefill ratio", "load s", "peak RSS MiB", "greedy = ref"]  # fmt: skip


def _table_row(r: dict) -> list:
    head = [r["config"], r["side"], r["variant"], r["batch"], r["threads"]]
    if "error" in r:
        return head + [r["error"][:60]] + ["-"] * 6
    keys = ["prefill_ms", "decode_tps", "decode_ratio", "prefill_ratio", "load_s", "rss_mib", "match"]
    return head + [r.get(k, "-") for k in keys]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--llama-src", type=Path, help="llama.cpp tree vendored by llama-cpp-python (converter)")
    ap.add_argument("--configs", nargs="+", default=list(MID_SPECS), choices=list(MID_SPECS))
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--thread-list", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--variants", nargs="+", default=VARIANTS, choices=[*VARIANTS, PLE4], help="our variants to time"
    )
    ap.add_argument(
        "--baseline", type=Path, help="an earlier --work folder: time its fp32 exports as fp32-base"
    )
    ap.add_argument("--plain", action="store_true", help="also time fp32 without the shared-shape rewrite")
    ap.add_argument(
        "--no-kernels", action="store_true", help="also time each variant with our CPU kernels off (-nokern)"
    )
    ap.add_argument("--log", type=Path, help="append each run's result to this JSON-lines file as it ends")
    ap.add_argument(
        "--no-ort-spin",
        dest="ort_spin",
        action="store_false",
        help="onnxruntime threads wait without spinning",
    )
    ap.add_argument("--omp-wait-policy", default="ACTIVE", help="OMP_WAIT_POLICY for llama.cpp's threads")
    ap.add_argument(
        "--work", type=Path, help="keep checkpoints, exports and GGUFs here (default: a temp dir)"
    )
    return ap.parse_args(argv)


def _require_llama(args: argparse.Namespace) -> None:
    from llamacpp_side import INSTALL_HINT

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit(f"llama_cpp is not installed: {INSTALL_HINT}")
    if not args.llama_src or not (args.llama_src / "convert_hf_to_gguf.py").is_file():
        sys.exit("--llama-src must be llama-cpp-python's vendor/llama.cpp (it holds convert_hf_to_gguf.py)")


def run(args: argparse.Namespace, work: Path) -> None:
    rows: list[dict] = []
    for cfg in args.configs:
        spec = MID_SPECS[cfg]
        ids = np.random.default_rng(0).integers(3, spec.vocab_size, (max(args.batches), args.prompt))
        ids_file = work / f"{cfg}-ids.npy"
        np.save(ids_file, ids)
        paths = prepare(cfg, work, args)
        refs = reference_tokens(cfg, work, ids, args.steps)
        skipped = [{"config": cfg, **asdict(c), "error": paths[c.side, c.variant]} for c in cells(args)
                   if isinstance(paths.get((c.side, c.variant)), str)]  # fmt: skip
        rows += rows_for(cfg, measure(cfg, paths, ids_file, args), refs, args) + skipped
    title = (
        f"greedy decode on CPU, ours (onnxruntime) vs llama.cpp: {args.prompt}-token prompt, {args.steps} tokens, "
        f"best of {args.repeat}; ratios > 1: ours faster"
    )
    report(
        title,
        COLUMNS,
        [_table_row(r) for r in rows],
        {"benchmark": "cpu_vs_llamacpp", **_meta(args), "rows": rows},
    )


def _meta(args: argparse.Namespace) -> dict:
    import llama_cpp
    import onnxruntime

    return {
        "prompt": args.prompt,
        "steps": args.steps,
        "repeat": args.repeat,
        "llama_omp_wait_policy": args.omp_wait_policy,
        "ort_allow_spinning": args.ort_spin,
        "onnxruntime": onnxruntime.__version__,
        "llama_cpp_python": llama_cpp.__version__,
    }


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    _require_llama(args)
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        run(args, args.work)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run(args, Path(tmp))


if __name__ == "__main__":
    main()
