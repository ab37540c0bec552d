"""Where MoE decode time goes on the CPU: a stack of `gemma4::MoE` layers with cold weights, run by onnxruntime
with each body, one process, blocks interleaved (issue #18).

    python benchmarks/moe_decode.py [--layers 12] [--hidden 512] [--inter 256] [--experts 16] [--top-k 4]
        [--tokens 1 4] [--repeat 8]

Defaults are the mid MoE config's (benchmarks/common.py MID_MOE) MoE blocks: 12 layers whose expert weights
(12 x 16 x 1.5 MB = 288 MB, fp32) do not fit in the CPU's caches, each layer with its own router MatMul, so a
decode step reads every routed expert from memory as the real decoder does. (One layer run in a loop keeps its
experts in the last-level cache and overstates what saving a copy is worth.) Bodies: `loop` (ops/moe/body.py
BODY, the export's), `gather` (BODY_GATHER: per-token weight gathers, one batched MatMul). Reports ms per call
(thread CPU time, best of --repeat blocks, robust to a shared machine), the bytes of expert weights a call
reads, and the resulting GB/s. Prints a table and one JSON line; never asserts.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import report

BODIES = ("loop", "gather")


def _stack(args: argparse.Namespace, folder: Path, body_name: str) -> bytes:
    """`args.layers` MoE layers in sequence (router MatMul, then MoE), weights external in folder/w.data."""
    from onnx import TensorProto, helper, numpy_helper

    from gemma4_compile.ops.moe import body
    from gemma4_compile.ops.onnx_domain import plugin_attributes

    E, H, inter = args.experts, args.hidden, args.inter
    rng = np.random.default_rng(0)
    inits, nodes, offset, prev = [], [], 0, "x"
    with open(folder / "w.data", "wb") as data:
        for layer in range(args.layers):
            tensors = {
                f"gate_up{layer}": rng.standard_normal((E, 2 * inter, H), np.float32) * 0.05,
                f"down{layer}": rng.standard_normal((E, H, inter), np.float32) * 0.05,
            }
            for name, array in tensors.items():
                data.write(array.tobytes())
                inits.append(_external(name, array, offset))
                offset += array.nbytes
            inits += [
                numpy_helper.from_array(rng.uniform(0.5, 1.5, E).astype(np.float32), f"scale{layer}"),
                numpy_helper.from_array(rng.standard_normal((H, E), np.float32), f"router{layer}"),
            ]
            inputs = [f"x{layer}", f"logits{layer}", f"scale{layer}", f"gate_up{layer}", f"down{layer}"]
            attrs = {"top_k": args.top_k, **plugin_attributes()}
            nodes += [  # normalized inputs: a GLU is quadratic, so unnormalized layers decay into denormals
                helper.make_node("LayerNormalization", [prev, "norm"], [f"x{layer}"], axis=-1),
                helper.make_node("MatMul", [f"x{layer}", f"router{layer}"], [f"logits{layer}"]),
                helper.make_node("MoE", inputs, [f"y{layer}"], domain="gemma4", **attrs),
            ]
            prev = f"y{layer}"
    inits.append(numpy_helper.from_array(np.ones(H, np.float32), "norm"))
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["T", H]) for n in ("x", prev)]
    graph = helper.make_graph(nodes, "moe_stack", io[:1], io[1:], initializer=inits)
    fn = body.function(body.BODY if body_name == "loop" else body.BODY_GATHER)
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("gemma4", 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=[fn])
    model.ir_version = 10
    return model.SerializeToString()


def _external(name: str, array: np.ndarray, offset: int):
    from onnx import TensorProto

    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w.data"), ("offset", offset), ("length", array.nbytes)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    return tensor


def _session(model: bytes, folder: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 1, 3
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeat", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sessions = {b: _session(_stack(args, folder, b), folder) for b in BODIES}
        results = {}
        for tokens in args.tokens:
            x = np.random.default_rng(1).standard_normal((tokens, args.hidden), np.float32)
            want = sessions["loop"].run(None, {"x": x})[0]
            best = dict.fromkeys(BODIES, np.inf)
            for block in range(args.repeat):
                for name in BODIES if block % 2 else BODIES[::-1]:
                    t0 = time.thread_time()
                    for _ in range(10):
                        got = sessions[name].run(None, {"x": x})[0]
                    best[name] = min(best[name], (time.thread_time() - t0) / 10)
                    err = float(np.abs(got - want).max() / np.abs(want).max())
                    assert err < 5e-2, (name, err)  # same math; 12 GLU layers amplify round-off (~6e-3 seen)
            results[tokens] = best
    per_expert = 3 * args.inter * args.hidden * 4
    rows, payload = [], {"benchmark": "moe_decode", **vars(args), "rows": []}
    for tokens, best in results.items():
        # distinct experts a call reads: at most E, at most tokens x top-k (every layer)
        read = args.layers * min(args.experts, tokens * args.top_k) * per_expert
        for name, s in best.items():
            rows.append([tokens, name, 1e3 * s, read / 2**20, read / s / 1e9, s / best["loop"]])
            payload["rows"].append({"tokens": tokens, "body": name, "ms": 1e3 * s, "expert_bytes": read})
    title = (
        f"{args.layers} MoE layers (H {args.hidden}, I {args.inter}, {args.experts} experts, top-{args.top_k}), "
        "cold weights, onnxruntime CPU 1 thread, thread CPU time, best of blocks"
    )
    columns = ["tokens", "body", "ms / call", "expert MiB read (at most)", "GB/s", "vs loop"]
    report(title, columns, rows, payload)


if __name__ == "__main__":
    main()
