"""Peak RSS and time of a prefill through one `gemma4::MoE` layer: the per-expert Loop body against the previous
per-token gather body, run by onnxruntime on the CPU, in one run.

    python benchmarks/moe_body.py [--tokens 16 512] [--hidden 2816] [--inter 704] [--experts 128] [--top-k 8]

Defaults are one 26B-A4B MoE layer (H 2816, I 704, 128 experts, top-8; random fp32 weights, 3 GB). Each
(body, tokens) runs in a process of its own, so each peak RSS is that body's alone. The gather body copies the
chosen experts' weights per token (T*K*3*I*H floats); where that scratch exceeds --max-scratch-gb the row is
skipped and the estimate shown instead. Prints a table and a JSON line; never asserts.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from common import report


def _model(body_name: str, shapes: dict[str, list[int]], top_k: int) -> bytes:
    from onnx import TensorProto, helper

    from gemma4_compile.ops.moe import body
    from gemma4_compile.ops.onnx_domain import plugin_attributes

    names = list(shapes)
    node = helper.make_node("MoE", names, ["y"], domain="gemma4", top_k=top_k, **plugin_attributes())
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()]
    graph = helper.make_graph(
        [node], "moe", info, [helper.make_tensor_value_info("y", TensorProto.FLOAT, shapes["x"])]
    )
    fn = body.function(getattr(body, body_name))
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("gemma4", 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=[fn])
    model.ir_version = 10
    return model.SerializeToString()


def child(args: argparse.Namespace) -> None:
    """One body, one token count: -> JSON {rss_before_mb, peak_rss_mb, p50_s} on stdout."""
    import numpy as np
    import onnxruntime as ort

    T, H, I, E, K = args.tokens[0], args.hidden, args.inter, args.experts, args.top_k  # noqa: E741
    rng = np.random.default_rng(0)

    def randn(
        *shape: int, scale: float = 1.0
    ) -> np.ndarray:  # scaled in place: no transient copy in the peak
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= scale
        return a

    feeds = {
        "x": randn(T, H),
        "router_logits": randn(T, E, scale=3.0),
        "per_expert_scale": rng.random(E, dtype=np.float32) + 0.5,
        "gate_up": randn(E, 2 * I, H, scale=H**-0.5),
        "down": randn(E, H, I, scale=I**-0.5),
    }
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(
        _model(args.child, {n: list(a.shape) for n, a in feeds.items()}, K),
        opts,
        providers=["CPUExecutionProvider"],
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rss_before_mb": before, "peak_rss_mb": peak, "p50_s": sorted(times)[len(times) // 2]}))


def scratch_gb(body_name: str, T: int, H: int, I: int, K: int) -> float:  # noqa: E741
    """The gather body's copied weights (T*K*3*I*H fp32); the Loop body copies none."""
    return T * K * 3 * I * H * 4 / 1e9 if body_name == "BODY_GATHER" else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 512])
    p.add_argument("--hidden", type=int, default=2816)
    p.add_argument("--inter", type=int, default=704)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-scratch-gb", type=float, default=6.0)
    p.add_argument("--child", choices=["BODY", "BODY_GATHER"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    rows, results = [], []
    for T in args.tokens:
        for name in ("BODY_GATHER", "BODY"):
            need = scratch_gb(name, T, args.hidden, args.inter, args.top_k)
            r = {"body": name, "tokens": T, "scratch_gb_est": need}
            if need > args.max_scratch_gb:
                r["skipped"] = f"needs ~{need:.0f} GB scratch > --max-scratch-gb {args.max_scratch_gb:g}"
            else:
                cmd = [sys.executable, __file__, "--child", name, "--tokens", str(T)]
                cmd += [
                    f"--{k}={getattr(args, k.replace('-', '_'))}"
                    for k in ("hidden", "inter", "experts", "top-k", "threads", "repeat")
                ]
                r |= json.loads(
                    subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
                )
            results.append(r)
    new = {r["tokens"]: r for r in results if r["body"] == "BODY"}
    for r in results:
        n = new[r["tokens"]]
        run = "p50_s" in r
        rows.append(
            [
                "loop (new)" if r["body"] == "BODY" else "gather (old)",
                r["tokens"],
                r["peak_rss_mb"] if run else "–",
                r["peak_rss_mb"] - r["rss_before_mb"] if run else r.get("skipped", ""),
                r["p50_s"] if run else "–",
                r["peak_rss_mb"] / n["peak_rss_mb"] if run else "–",
                r["p50_s"] / n["p50_s"] if run else "–",
            ]
        )
    config = {k: getattr(args, k) for k in ("hidden", "inter", "experts", "top_k", "threads")}
    report(
        f"MoE body, one layer (H {args.hidden}, I {args.inter}, E {args.experts}, top-{args.top_k}, fp32, ORT CPU, "
        f"{args.threads} thread(s))",
        ["body", "tokens", "peak RSS MiB", "RSS during run MiB", "p50 s", "RSS / loop", "time / loop"],
        rows,
        {"bench": "moe_body", "config": config, "rows": results},
    )


if __name__ == "__main__":
    main()
