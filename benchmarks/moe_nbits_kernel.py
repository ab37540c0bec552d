"""`gemma4_ort::MoENBits` alone (runners/ort_kernels/moe_nbits.cc), one process, one-node sessions, hot weights:

    python benchmarks/moe_nbits_kernel.py [--threads 1] [--repeat 3]

1. One MoE layer call at the mid MoE config's shapes (H 512, I 256, 16 experts, top-4, block 32) for 1 and 64
   tokens at accuracy levels 0 and 4.
2. One expert's GLU (H 512, I 768, one token) as MoENBits (E=1, K=1) against onnxruntime's MatMulNBits ->
   Split -> Gelu -> Mul -> MatMulNBits at the same level (MLAS's int4 GEMV), with their largest difference.
3. A one-token call at the full 26B-A4B shapes (H 2816, I 704, top-8) over 32 experts (~120 MB of codes) with
   new routing logits every call, so the picked experts come from DRAM as in a real decode step: the kernel
   against the same source built with -DGEMMA4_NO_ROW_STREAMING (one token's 4-row tiles for every row length),
   rounds of 64 calls alternating, median of rounds, and the picked experts' bytes per second.

Prints a table (best of --repeat, microseconds per call) and one JSON line. Needs the kernel library
(`python -m gemma4_compile.runners.ort_kernels`).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from common import report
from onnx import TensorProto, helper, numpy_helper

from gemma4_compile.ops.moe import body
from gemma4_compile.runners import ort_kernels

INPUTS = ("x", "r", "s", "gu", "gu_scales", "dn", "dn_scales")
B = 32


def _codes(rng, E: int, N: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    blocks = -(-K // B)
    codes = rng.integers(0, 256, (E, N, blocks, B // 2), dtype=np.uint8)
    return codes, rng.uniform(0.02, 0.08, (E, N, blocks)).astype(np.float32)


def _session(
    nodes, weights: dict, opsets: list, threads: int, library: str, inputs: tuple[str, ...] = ("x",)
) -> ort.InferenceSession:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for n, a in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(*o) for o in opsets], ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _moe(rng, T: int, H: int, I: int, E: int, K: int, level: int, threads: int, library: str, routed=False):  # noqa: E741
    """A MoENBits session and its weights; the routing logits are fixed initializers, or (`routed`) an input."""
    gu, gu_s = _codes(rng, E, 2 * I, H)
    dn, dn_s = _codes(rng, E, H, I)
    weights = {
        **({} if routed else {"r": (rng.standard_normal((T, E)) * 3).astype(np.float32)}),
        "s": np.ones(E, np.float32),
        "gu": gu,
        "gu_scales": gu_s,
        "dn": dn,
        "dn_scales": dn_s,
    }
    node = helper.make_node(
        "MoENBits",
        list(INPUTS),
        ["y"],
        domain=body.KERNEL_DOMAIN,
        top_k=K,
        block_size=B,
        accuracy_level=level,
    )
    opsets = [("", 20), (body.KERNEL_DOMAIN, 1)]
    inputs = ("x", "r") if routed else ("x",)
    return _session([node], weights, opsets, threads, library, inputs), weights


def _matmulnbits_glu(weights: dict, H: int, I: int, level: int, threads: int, library: str):  # noqa: E741
    attrs = {"bits": 4, "block_size": B, "accuracy_level": level}
    nodes = [
        helper.make_node(
            "MatMulNBits", ["x", "gu", "gus"], ["h"], domain="com.microsoft", K=H, N=2 * I, **attrs
        ),
        helper.make_node("Split", ["h"], ["g", "u"], axis=-1, num_outputs=2),
        helper.make_node("Gelu", ["g"], ["ga"], approximate="tanh"),
        helper.make_node("Mul", ["ga", "u"], ["a"]),
        helper.make_node("MatMulNBits", ["a", "dn", "dns"], ["y"], domain="com.microsoft", K=I, N=H, **attrs),
    ]
    one = {
        "gu": weights["gu"][0],
        "gus": weights["gu_scales"][0],
        "dn": weights["dn"][0],
        "dns": weights["dn_scales"][0],
    }
    return _session(nodes, one, [("", 20), ("com.microsoft", 1)], threads, library)


def _time(session, feeds: dict, repeat: int) -> float:
    """Best of `repeat` rounds, microseconds per call (each round ~0.2 s)."""
    session.run(None, feeds)
    t0 = time.perf_counter()
    session.run(None, feeds)
    calls = max(3, int(0.2 / max(time.perf_counter() - t0, 1e-6)))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(calls):
            session.run(None, feeds)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


FULL = {
    "H": 2816,
    "I": 704,
    "E": 32,
    "K": 8,
}  # 26B-A4B's hidden and expert sizes, top-8; 32 of its 128 experts


def cold_decode(rng, level: int, threads: int, rounds: int) -> dict:
    """Section 3: us per one-token call, streaming rows vs 4-row tiles throughout, and GB/s of picked experts."""
    H, I, E, K = FULL["H"], FULL["I"], FULL["E"], FULL["K"]  # noqa: E741
    libraries = {
        "streaming": str(ort_kernels.library()),
        "tiles": str(ort_kernels.build(extra_flags=("-DGEMMA4_NO_ROW_STREAMING",))),
    }
    # the same weights in both sessions
    sessions = {
        k: _moe(np.random.default_rng(1), 1, H, I, E, K, level, threads, lib, True)[0]
        for k, lib in libraries.items()
    }
    x = rng.standard_normal((1, H), dtype=np.float32)
    feeds = [{"x": x, "r": (rng.standard_normal((1, E)) * 3).astype(np.float32)} for _ in range(64)]
    outs = {k: s.run(None, feeds[0])[0] for k, s in sessions.items()}
    us: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(rounds):
        for k in list(sessions)[:: 1 if i % 2 else -1]:  # alternating, so load drifts hit both
            t0 = time.perf_counter()
            for f in feeds:
                sessions[k].run(None, f)
            us[k].append((time.perf_counter() - t0) / len(feeds) * 1e6)
    med = {k: float(np.median(v)) for k, v in us.items()}
    picked = K * 3 * H * I * (0.5 + 4 / B)  # codes and scales of the K picked experts
    return {
        **{f"{k}_us": v for k, v in med.items()},
        **{f"{k}_gb_s": picked / v / 1e3 for k, v in med.items()},
        "max_rel_diff": float(np.abs(outs["streaming"] - outs["tiles"]).max() / np.abs(outs["tiles"]).max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    library = str(ort_kernels.library())
    rng = np.random.default_rng(0)
    rows, payload = [], {"benchmark": "moe_nbits_kernel", "threads": args.threads, "layer_us": {}, "glu": {}}
    for T in (1, 64):
        for level in (0, 4):
            session, _ = _moe(rng, T, 512, 256, 16, 4, level, args.threads, library)
            us = _time(session, {"x": rng.standard_normal((T, 512), dtype=np.float32)}, args.repeat)
            rows.append([f"MoE layer, {T} token(s)", level, us, "-", "-"])
            payload["layer_us"][f"T{T}_level{level}"] = us
    for level in (0, 4):
        ours, weights = _moe(rng, 1, 512, 768, 1, 1, level, args.threads, library)
        theirs = _matmulnbits_glu(weights, 512, 768, level, args.threads, library)
        feeds = {"x": rng.standard_normal((1, 512), dtype=np.float32)}
        a, b = ours.run(None, feeds)[0], theirs.run(None, feeds)[0]
        diff = float(np.abs(a - b).max() / np.abs(b).max())
        ours_us, theirs_us = _time(ours, feeds, args.repeat), _time(theirs, feeds, args.repeat)
        rows.append(["one expert's GLU", level, ours_us, theirs_us, f"{theirs_us / ours_us:.2f}"])
        payload["glu"][f"level{level}"] = {
            "ours_us": ours_us,
            "matmulnbits_us": theirs_us,
            "max_rel_diff": diff,
        }
    payload["cold_full_size"] = {}
    for level in (0, 4):
        cold = cold_decode(rng, level, args.threads, 2 * args.repeat + 2)
        payload["cold_full_size"][f"level{level}"] = cold
        ratio = f"{cold['tiles_us'] / cold['streaming_us']:.2f}"
        rows.append(["full-size, cold, 1 token", level, cold["streaming_us"], "-", "-"])
        rows.append(["  same, 4-row tiles throughout", level, cold["tiles_us"], "-", ratio])
    report(
        f"MoENBits, {args.threads} thread(s), best of {args.repeat} (full-size rows: median of rounds): us per call "
        "(ratio > 1: ours faster; last rows: streaming rows over 4-row tiles)",
        ["call", "level", "MoENBits us", "MatMulNBits GLU us", "ratio"],
        rows,
        payload,
    )


if __name__ == "__main__":
    main()
