"""Can onnxruntime's own MoE kernels run Gemma 4's experts on the CPU? (issue #18)

    python benchmarks/ort_moe_probe.py

Gemma 4's expert is down(GELU-tanh(gate x) * up x), routed by softmax over all experts, top-k, renormalized.
onnxruntime's `com.microsoft.MoE` (fp32) and `QMoE` (4-bit block weights, the MatMulNBits code layout with its
implicit zero point 8) route the same way (`normalize_routing_weights=1`) and take the gated form as
`activation(fc1 x) * fc3 x`. This runs both, gated (Gemma's form) and ungated (fc1 only), on a small random
case, and reports per form whether the installed onnxruntime runs it and its max |error| against a numpy
reference (GELU-tanh; QMoE against the dequantized weights). A gated form that runs within fp32 tolerance is what
would let the exports' MoE node map to one onnxruntime kernel instead of the function body. Prints a table and
one JSON line.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
from common import report
from onnx import TensorProto, helper

T, H, I, E, K, BLOCK = 3, 32, 16, 4, 2, 16  # noqa: E741 (I: the expert width, as in the spec)


def gelu_tanh(g: np.ndarray) -> np.ndarray:
    return 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))


def reference(x, logits, fc1, fc2, fc3) -> np.ndarray:
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = np.zeros_like(x)
    for t in range(len(x)):
        picked = np.argsort(-p[t], kind="stable")[:K]
        weights = p[t, picked] / p[t, picked].sum()
        for w, e in zip(weights, picked):
            a = gelu_tanh(fc1[e] @ x[t]) * (fc3[e] @ x[t] if fc3 is not None else 1.0)
            y[t] += w * (fc2[e] @ a)
    return y


def int4_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[E, N, K] -> (codes [E, N, K/2] low nibble first, zero point 8; scales [E, N, K/BLOCK]; dequantized)."""
    e, n, k = w.shape
    blocks = w.reshape(e, n, k // BLOCK, BLOCK)
    scale = (np.abs(blocks).max(-1) / 7).astype(np.float32)
    codes = np.clip(np.round(blocks / scale[..., None]), -8, 7).astype(np.int32) + 8
    deq = ((codes - 8) * scale[..., None]).reshape(e, n, k).astype(np.float32)
    flat = codes.reshape(e, n, k)
    return (flat[..., 0::2] | (flat[..., 1::2] << 4)).astype(np.uint8), scale, deq


def run(op: str, feeds: dict[str, np.ndarray], inputs: list[str], **attrs) -> np.ndarray:
    node = helper.make_node(op, inputs, ["y"], domain="com.microsoft", k=K, activation_type="gelu", **attrs)
    types = {n: helper.np_dtype_to_tensor_dtype(a.dtype) for n, a in feeds.items()}
    graph = helper.make_graph(
        [node],
        op,
        [helper.make_tensor_value_info(n, types[n], None) for n in feeds],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the refusal is reported in the table, not logged
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def probe(op: str, gated: bool, rng: np.random.Generator) -> dict:
    x = rng.standard_normal((T, H)).astype(np.float32)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    gate, up = (rng.standard_normal((E, I, H)).astype(np.float32) / 4 for _ in range(2))
    down = rng.standard_normal((E, H, I)).astype(np.float32) / 4
    feeds = {"x": x, "r": logits}
    if op == "MoE":
        feeds |= {"fc1": gate, "fc2": down} | ({"fc3": up} if gated else {})
        inputs = ["x", "r", "fc1", "", "fc2", ""] + (["fc3"] if gated else [])
        attrs = {}
    else:
        (c1, s1, gate), (c2, s2, down), (c3, s3, up) = (int4_blocks(w) for w in (gate, down, up))
        feeds |= {"c1": c1, "s1": s1, "c2": c2, "s2": s2} | ({"c3": c3, "s3": s3} if gated else {})
        inputs = ["x", "r", "c1", "s1", "", "c2", "s2", ""] + (["c3", "s3"] if gated else [])
        attrs = {"expert_weight_bits": 4, "block_size": BLOCK}
    want = reference(x, logits, gate, down, up if gated else None)
    try:
        got = run(op, feeds, inputs, normalize_routing_weights=1, **attrs)
    except Exception as e:  # onnxruntime's NOT_IMPLEMENTED / Fail: the form is not available
        reason = str(e).split("Status Message:")[-1].strip().splitlines()[0]
        return {"op": op, "gated": gated, "runs": False, "max_abs_err": None, "reason": reason}
    return {
        "op": op,
        "gated": gated,
        "runs": True,
        "max_abs_err": float(np.abs(got - want).max()),
        "reason": "",
    }


def main() -> None:
    rng = np.random.default_rng(0)
    rows = [probe(op, gated, rng) for op in ("MoE", "QMoE") for gated in (True, False)]
    report(
        f"onnxruntime {ort.__version__} CPU MoE kernels on Gemma 4's expert form (T={T}, H={H}, I={I}, E={E}, k={K})",
        ["op", "form", "runs", "max |err|", "reason"],
        [
            [
                r["op"],
                "gated (Gemma)" if r["gated"] else "ungated",
                r["runs"],
                r["max_abs_err"] or "-",
                r["reason"],
            ]
            for r in rows
        ],
        {"onnxruntime": ort.__version__, "probes": rows},
    )


if __name__ == "__main__":
    main()
