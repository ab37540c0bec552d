"""Where the CPU time goes: one decode step and one long prefill of OrtRunner, per runner stage and per op type.

    python benchmarks/profile_cpu.py [--config e2b] [--prefill 512] [--steps 32] [--threads 2] [--export DIR]
        [--no-share-shapes] [--no-fuse] [--no-decode-ring] [--ab [share_shapes|fuse|decode_ring]]

Runner stages come from Python timers around the runner's own calls (argument checks, the embed session, the
decoder session, and the rest of `step`: feeds, cache hand-off, outputs). The decoder session's time is split
again with onnxruntime's profiler on a second runner (profiling slows every kernel, so these rows come from
that runner alone): `model_run` is graph execution, the remainder of its Python-side call is binding inputs
and fetching outputs (cache copies included). Op types are summed from the profiler's kernel events, per
decode step and per prefill, as a share of `model_run`. Prints a table and one JSON line.

`--ab [share_shapes|fuse|decode_ring]` instead compares the runner with and without one option in one process
(default: its shared-shape rewrite; `fuse`: the norm / rotary fusions inside that rewrite; `decode_ring`: its
one-token cache scatter):
blocks of `--steps` decode steps (and `--repeat` prefills) alternate between the two runners, each block timed,
so load drifts on a shared machine hit both sides; it reports medians and the median of per-block ratios.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import MID_SPECS, report

from gemma4_compile.export.manifest import DECODER, EMBED
from gemma4_compile.runners.ort import OrtRunner

DECODE_STEPS_PROMPT = 64  # context the timed decode steps start from (past the sliding window of 64)


class Stages:
    """Accumulates wall time per stage name; `wrap` times any callable under a name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[name] += time.perf_counter() - t0

        return timed


class TimedSession:
    """An InferenceSession whose run calls are timed (whichever the runner uses)."""

    def __init__(self, session, stages: Stages, name: str):
        self._s = session
        self.run = stages.wrap(name, session.run)
        self.run_with_iobinding = stages.wrap(name, session.run_with_iobinding)

    def __getattr__(self, attr: str):
        return getattr(self._s, attr)


def instrument(runner: OrtRunner) -> Stages:
    stages = Stages()
    runner._checked = stages.wrap("checks", runner._checked)
    # in place: the IO-binding path holds the same dict
    runner.sessions[EMBED] = TimedSession(runner.sessions[EMBED], stages, "embed session")
    runner.sessions[DECODER] = TimedSession(runner.sessions[DECODER], stages, "decoder session")
    return stages


def _prompted_state(runner: OrtRunner, extra: int):
    """A batch-1 state after a DECODE_STEPS_PROMPT-token prefill, room for `extra` more tokens."""
    ids = np.random.default_rng(0).integers(3, runner.spec.vocab_size, (1, DECODE_STEPS_PROMPT))
    state = runner.start(1, DECODE_STEPS_PROMPT + extra)
    runner.step(state, ids, np.array([DECODE_STEPS_PROMPT]))
    return state


def _decode_calls(runner: OrtRunner, steps: int) -> tuple[Callable[[], object], int]:
    state, tok, one = _prompted_state(runner, steps + 1), np.array([[5]]), np.array([1])
    return lambda: [runner.step(state, tok, one) for _ in range(steps)], steps


def _prefill_call(runner: OrtRunner, length: int) -> tuple[Callable[[], object], int]:
    ids = np.random.default_rng(0).integers(3, runner.spec.vocab_size, (1, length))
    return lambda: runner.step(runner.start(1, length), ids, np.array([length])), 1


def timed_steps(runner: OrtRunner, args: argparse.Namespace, phase: str) -> dict[str, float]:
    """Per-call stage times (ms) of `phase` ("decode": one-token steps; "prefill": one long prompt), best run."""
    best: dict[str, float] | None = None
    for _ in range(args.repeat):
        work, calls = (
            _decode_calls(runner, args.steps) if phase == "decode" else _prefill_call(runner, args.prefill)
        )
        stages = instrument(runner)
        total = _clock(work)
        _uninstrument(runner)
        per = {k: 1000 * v / calls for k, v in stages.seconds.items()}
        per["step total"] = 1000 * total / calls
        per["rest of step (feeds, cache hand-off, outputs)"] = per["step total"] - sum(
            per.get(k, 0.0) for k in ("checks", "embed session", "decoder session")
        )
        best = per if best is None or per["step total"] < best["step total"] else best
    return best


def _clock(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _uninstrument(runner: OrtRunner) -> None:
    del runner._checked  # back to the class method
    for role in (EMBED, DECODER):
        runner.sessions[role] = runner.sessions[role]._s


def op_profile(export: Path, args: argparse.Namespace, phase: str, workdir: Path) -> dict:
    """onnxruntime's profiler over `phase`: ms per call by op type, and graph time (`model_run`) per call."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / f"ort-{phase}")
    runner = OrtRunner(export, threads=args.threads, options=options, **_runner_flags(args))
    work, calls = (
        _decode_calls(runner, args.steps) if phase == "decode" else _prefill_call(runner, args.prefill)
    )
    stages = instrument(runner)  # the same calls as the profile: the profiler's overhead is on both sides
    work()
    _uninstrument(runner)
    events = json.loads(Path(runner.sessions[DECODER].end_profiling()).read_text())
    runner.sessions[EMBED].end_profiling()
    runs = [e for e in events if e.get("name") == "model_run"]
    skip = 1 if phase == "decode" else 0  # the decode profile starts with its prompt's prefill
    profiled = {"profiled_session_ms": 1000 * stages.seconds["decoder session"] / calls}
    return {**_by_op(events, runs[skip:]), **profiled}


def _by_op(events: list[dict], runs: list[dict]) -> dict:
    start = runs[0]["ts"]
    ops: dict[str, float] = defaultdict(float)
    nodes = 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            ops[e["args"]["op_name"]] += e["dur"]
            nodes += 1
    n = len(runs)
    return {
        "model_run_ms": sum(r["dur"] for r in runs) / n / 1000,
        "kernels_per_call": nodes / n,
        "ops_ms": {k: v / n / 1000 for k, v in sorted(ops.items(), key=lambda kv: -kv[1])},
    }


def ab_option(export: Path, args: argparse.Namespace) -> dict:
    """Interleaved blocks: ms per decode step and per prefill with the runner option `args.ab` on and off, and
    their ratios (everything else at the runner's defaults)."""
    runners = {on: OrtRunner(export, threads=args.threads, **{args.ab: on}) for on in (True, False)}
    tok, one = np.array([[5]]), np.array([1])

    def decode(on: bool) -> Callable[[], object]:
        state = _prompted_state(runners[on], args.steps)  # a fresh state per block, prefilled untimed
        return lambda: [runners[on].step(state, tok, one) for _ in range(args.steps)]

    phases = {
        "decode": (args.blocks, decode, args.steps),
        "prefill": (2 * args.repeat, lambda on: _prefill_call(runners[on], args.prefill)[0], 1),
    }
    out = {}
    for phase, (n, work, calls) in phases.items():
        ms: dict[bool, list[float]] = {True: [], False: []}
        for block in range(n):
            for on in (True, False) if block % 2 else (False, True):
                ms[on].append(1000 * _clock(work(on)) / calls)
        on, off = np.array(ms[True]), np.array(ms[False])
        out[phase] = {
            "blocks": n,
            "on_ms": float(np.median(on)),
            "off_ms": float(np.median(off)),
            "on_over_off": float(np.median(on / off)),  # median of per-block ratios
        }
    return out


def export_for(args: argparse.Namespace, tmp: Path) -> Path:
    if args.export:
        return args.export
    import torch

    from gemma4_compile.export import export_checkpoint
    from gemma4_compile.model.checkpoint import write_random_checkpoint

    ckpt, out = tmp / "ckpt", tmp / "export"
    write_random_checkpoint(MID_SPECS[args.config], ckpt, dtype=torch.float32, multimodal=False)
    export_checkpoint(ckpt, out, max_seq_len=max(args.prefill, DECODE_STEPS_PROMPT + args.steps + 1))
    return out


def _runner_flags(args: argparse.Namespace) -> dict:
    return {
        "io_binding": not args.no_io_binding,
        "share_shapes": not args.no_share_shapes,
        "fuse": not args.no_fuse,
        "decode_ring": not args.no_decode_ring,
    }


def session_start_s(export: Path, args: argparse.Namespace) -> float:
    return _clock(lambda: OrtRunner(export, threads=args.threads, **_runner_flags(args)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="e2b", choices=list(MID_SPECS))
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=16, help="--ab: decode blocks per side")
    ap.add_argument("--top", type=int, default=12, help="op types shown per phase")
    ap.add_argument("--export", type=Path, help="profile this export instead of a fresh random one")
    ap.add_argument("--no-io-binding", action="store_true", help="the numpy-feed path (before the binding)")
    ap.add_argument(
        "--no-share-shapes",
        action="store_true",
        help="the decoder graph as exported (per-layer masks and shapes)",
    )
    ap.add_argument(
        "--no-fuse",
        action="store_true",
        help="the rewrite without its norm / rotary fusions (ort_fusions.py)",
    )
    ap.add_argument(
        "--no-decode-ring",
        action="store_true",
        help="the rewrite without its one-token cache scatter (ops/attention/body.py decode_ring)",
    )
    ap.add_argument(
        "--ab",
        nargs="?",
        const="share_shapes",
        choices=["share_shapes", "fuse", "decode_ring"],
        help="interleaved blocks with this OrtRunner option on / off instead of the profile",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export = export_for(args, Path(tmp))
        if args.ab:
            return _report_ab(args, ab_option(export, args))
        start_s = session_start_s(export, args)
        runner = OrtRunner(export, threads=args.threads, **_runner_flags(args))
        runner.generate(np.array([[5, 6, 7]]), 2)  # warm-up
        result = {}
        for phase in ("decode", "prefill"):
            stages = timed_steps(runner, args, phase)
            result[phase] = {"stages_ms": stages, **op_profile(export, args, phase, Path(tmp))}
    rows = _rows(result, args.top)
    title = (
        f"OrtRunner CPU profile, mid {args.config}, {args.threads} threads: one decode step (context "
        f"{DECODE_STEPS_PROMPT}+) and one {args.prefill}-token prefill, ms per call"
    )
    payload = {"benchmark": "profile_cpu", "config": args.config, **_runner_flags(args)}
    payload.update(session_start_s=start_s, **result)
    columns = ["phase", "kind", "name", "ms", "% of step (ops: of model_run)"]
    report(title, columns, rows, payload)


def _report_ab(args: argparse.Namespace, result: dict) -> None:
    title = (
        f"OrtRunner {args.ab} on vs off, mid {args.config}, {args.threads} threads: interleaved blocks of "
        f"{args.steps} decode steps (context {DECODE_STEPS_PROMPT}+) and {args.prefill}-token prefills, ms per call"
    )
    rows = [[phase, r["blocks"], r["off_ms"], r["on_ms"], r["on_over_off"]] for phase, r in result.items()]
    columns = ["phase", "blocks per side", "off ms (median)", "on ms (median)", "on / off (median)"]
    payload = {"benchmark": "profile_cpu_ab", "config": args.config, "option": args.ab, **result}
    report(title, columns, rows, payload)


def _rows(result: dict, top: int) -> list[list]:
    rows = []
    for phase, r in result.items():
        total = r["stages_ms"]["step total"]
        for name, ms in r["stages_ms"].items():
            rows.append([phase, "stage", name, ms, 100 * ms / total])
        outside = r["profiled_session_ms"] - r["model_run_ms"]  # both from the profiled session
        graph = r["model_run_ms"]
        rows.append([phase, "session", "graph execution (model_run)", graph, 100 * graph / total])
        rows.append([phase, "session", "bind inputs + fetch outputs", outside, 100 * outside / total])
        rows.append([phase, "session", f"kernels per call: {r['kernels_per_call']:.0f}", "", ""])
        for op, ms in list(r["ops_ms"].items())[:top]:  # % of graph time: both from the profiled run
            rows.append([phase, "op", op, ms, 100 * ms / graph])
    return rows


if __name__ == "__main__":
    main()
