"""The MoE bodies (`BODY_SPLIT`, the export's: one token by `BODY_GATHER`'s per-token gather, more by `BODY`'s
per-expert loop; and `BODY_STATIC` for TensorRT inlining) against the per-token gather body and the torch reference, run by onnxruntime, in fp32 and fp16, including experts no token picks;
`BODY` runs only the experts some token picked (counted in onnxruntime's profile), and a tiny MoE export keeps
transformers' greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from gemma4_compile.model import ops
from gemma4_compile.ops.moe import body
from gemma4_compile.ops.onnx_domain import plugin_attributes

NAMES = ("x", "r", "s", "gu", "dn")


def _session(
    fn: onnx.FunctionProto,
    shapes: dict[str, tuple[int, ...]],
    elem: int,
    K: int,
    options: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    node = helper.make_node("MoE", list(NAMES), ["y"], domain="gemma4", top_k=K, **plugin_attributes())
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, elem, list(s)) for n, s in shapes.items()],
        [helper.make_tensor_value_info("y", elem, list(shapes["x"]))],
    )
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("gemma4", 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=[fn])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _inputs(T, H, I, E, K, seed=3):  # noqa: E741
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(T, H, generator=g),
        torch.randn(T, E, generator=g) * 3,
        torch.rand(E, generator=g) + 0.5,
        torch.randn(E, 2 * I, H, generator=g) / 4,
        torch.randn(E, H, I, generator=g) / 4,
    )


def _run(text: str, tensors, K: int, dtype=np.float32) -> np.ndarray:
    feeds = {n: t.numpy().astype(dtype) for n, t in zip(NAMES, tensors)}
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    sess = _session(body.function(text), {n: a.shape for n, a in feeds.items()}, elem, K)
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize(
    ("T", "H", "I", "E", "K"),
    [(1, 16, 8, 8, 1), (9, 16, 8, 8, 2), (40, 32, 16, 16, 4), (3, 16, 8, 128, 8)],  # last: most experts idle
)
@pytest.mark.parametrize("text", ["BODY", "BODY_STATIC", "BODY_SPLIT"])
def test_loop_body_equals_gather_body_and_torch(T, H, I, E, K, text):  # noqa: E741
    tensors = _inputs(T, H, I, E, K)
    new, old = _run(getattr(body, text), tensors, K), _run(body.BODY_GATHER, tensors, K)
    ref = ops.moe_reference(*tensors, K).numpy()
    np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new, ref, rtol=1e-5, atol=1e-5)


def test_loop_body_in_fp16():
    tensors = _inputs(12, 32, 16, 16, 4)
    new = _run(body.BODY, tensors, 4, np.float16).astype(np.float32)
    old = _run(body.BODY_GATHER, tensors, 4, np.float16).astype(np.float32)
    np.testing.assert_allclose(new, old, rtol=2e-2, atol=2e-2)


def test_a_wrong_top_k_is_detected():
    """The comparison can fail: top-2 routing differs from top-3."""
    tensors = _inputs(9, 16, 8, 8, 3)
    assert np.abs(_run(body.BODY, tensors, 2) - ops.moe_reference(*tensors, 3).numpy()).max() > 1e-2


def test_loop_body_has_no_per_token_weight_gather():
    """The scaling property in the graph: weights are gathered by a scalar expert id, never by [T, K] ids."""
    fn = body.function(body.BODY)
    loop = next(n for n in fn.node if n.op_type == "Loop")
    inner = loop.attribute[0].g
    weight_gathers = [n for n in inner.node if n.op_type == "Gather" and n.input[0] in ("gate_up", "down")]
    assert [n.input[1] for n in weight_gathers] == ["e", "e"]
    assert not any(n.op_type == "Gather" and n.input[0] in ("gate_up", "down") for n in fn.node)


def test_static_body_has_no_data_dependent_shapes():
    """TensorRT-RTX imports no NonZero; the static twin must really be a different graph."""

    def loop_ops(text: str) -> set[str]:
        loop = next(n for n in body.function(text).node if n.op_type == "Loop")
        return {n.op_type for n in loop.attribute[0].g.node}

    ops_of = {t: loop_ops(t) for t in (body.BODY, body.BODY_STATIC)}
    assert {"NonZero", "ScatterND"} <= ops_of[body.BODY]
    assert not {"NonZero", "ScatterND", "GatherND"} & ops_of[body.BODY_STATIC]
    assert not any(n.op_type == "Unique" for n in body.function(body.BODY_STATIC).node)


def _kernels(text: str, tensors, K: int, tmp_path: Path) -> dict[str, int]:
    """op type -> kernels onnxruntime ran for one call of the body."""
    feeds = {n: t.numpy() for n, t in zip(NAMES, tensors)}
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "moe")
    sess = _session(
        body.function(text), {n: a.shape for n, a in feeds.items()}, TensorProto.FLOAT, K, options
    )
    sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    ops_run = [e["args"].get("op_name") for e in events if e.get("cat") == "Node" and "op_name" in e["args"]]
    return {op: ops_run.count(op) for op in set(ops_run)}


@pytest.mark.parametrize(("T", "K"), [(1, 2), (1, 4), (2, 1)])
def test_a_decode_step_runs_only_the_routed_experts(T, K, tmp_path):
    """The point of the loop over `Unique` ids: T tokens with top-K run at most T*K of the 16 experts."""
    tensors = _inputs(T, 16, 8, 16, K)
    hit = len(torch.unique(ops.route(tensors[1], tensors[2], K)[1]))
    assert hit <= T * K < 16
    assert _kernels(body.BODY, tensors, K, tmp_path).get("Gemm") == 2 * hit
    assert (
        _kernels(body.BODY_STATIC, tensors, K, tmp_path).get("Gemm") == 2 * 16
    )  # the count tells them apart


@pytest.mark.parametrize("T", [1, 2])
def test_the_export_body_gathers_one_tokens_experts_and_loops_over_more(T, tmp_path):
    """BODY_SPLIT: one token runs no Loop (its K experts in one batched MatMul pair); two tokens run the loop."""
    ran = _kernels(body.BODY_SPLIT, _inputs(T, 16, 8, 16, 2), 2, tmp_path)
    assert ("Loop" in ran) == (T > 1) and ("MatMul" in ran) == (T == 1)


@pytest.mark.slow  # the tiny MoE export (shared with other tests in a full run) is most of its ~80 s
def test_tiny_moe_export_keeps_transformers_greedy_tokens(make_export, make_checkpoint):
    """The whole decoder on onnxruntime against transformers (fp32): a ragged batch of two prompts, one of 3W + 3
    tokens, then 24 one-token steps, where the body runs only the routed experts (2 of 8 per row)."""
    from gemma4_compile.runners.ort import OrtRunner
    from gemma4_compile.validate import HFRunner

    ckpt = make_checkpoint("tiny-26b-a4b")
    ours, hf = OrtRunner(make_export("tiny-26b-a4b")), HFRunner(ckpt)
    W = ours.spec.sliding_window
    ids = np.random.default_rng(7).integers(3, ours.spec.vocab_size, (2, 3 * W + 3))
    lengths = np.array([3 * W + 3, W - 2])
    got, want = ours.generate_with_logits(ids, 24, lengths), hf.generate_with_logits(ids, 24, lengths)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-4)
