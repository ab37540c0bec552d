"""passes/ort_attention.py: the head norms and rotations around each attention kernel move into one
`gemma4_ort::NormRopeAttention`, with the values of the nodes it replaces (onnxruntime's SimplifiedLayerNormalization
and RotaryEmbedding, our SlidingWindowAttention), on a prompt past the window and on one-token steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from kernel_support import built
from onnx import TensorProto, helper

from gemma4_compile.ops.contract import KERNEL_DOMAIN
from gemma4_compile.passes.ort_attention import FuseAttentionInputs

B, HQ, HKV, D, C, W, EPS = 2, 4, 2, 16, 6, 6, 1e-6
F, I64 = TensorProto.FLOAT, TensorProto.INT64


@pytest.fixture(scope="module")
def library() -> Path:
    return built()


def _heads(nodes: list, raw: str, heads: int, name: str, rotate: bool, reshaped: str | None = None) -> str:
    """raw [B, S, heads * D] -> Reshape -> norm(w_name) -> Transpose (-> rotation): the exporter's chain."""
    if reshaped is None:
        reshaped = f"{name}_4"
        nodes.append(helper.make_node("Reshape", [raw, f"shape_{heads}"], [reshaped]))
    nodes.append(
        helper.make_node(
            "SimplifiedLayerNormalization",
            [reshaped, f"w_{name}"],
            [f"{name}_n"],
            axis=-1,
            epsilon=EPS,
            stash_type=1,
        )
    )
    nodes.append(helper.make_node("Transpose", [f"{name}_n"], [f"{name}_t"], perm=[0, 2, 1, 3]))
    if not rotate:
        return f"{name}_t"
    nodes.append(
        helper.make_node(
            "RotaryEmbedding",
            [f"{name}_t", "ids", "cos", "sin"],
            [f"{name}_r"],
            domain="com.microsoft",
            interleaved=0,
        )
    )
    return f"{name}_r"


def _model(S: int, k_eq_v: bool = False, k_read_elsewhere: bool = False) -> onnx.ModelProto:
    """One layer: q / k / v chains, our attention kernel, the output transpose + reshape."""
    nodes: list = []
    q = _heads(nodes, "q_raw", HQ, "q", True)
    k = _heads(nodes, "k_raw", HKV, "k", True)
    v = _heads(nodes, "k_raw" if k_eq_v else "v_raw", HKV, "v", False, "k_4" if k_eq_v else None)
    nodes.append(
        helper.make_node(
            "SlidingWindowAttention",
            [q, k, v, "past_k", "past_v", "past_len", "seq_len"],
            ["o", "present_k", "present_v"],
            domain=KERNEL_DOMAIN,
            window=W,
            scale=1.0,
        )
    )
    nodes.append(helper.make_node("Transpose", ["o"], ["o_t"], perm=[0, 2, 1, 3]))
    nodes.append(helper.make_node("Reshape", ["o_t", "shape_out"], ["out"]))
    outputs = ["out", "present_k", "present_v"]
    if k_read_elsewhere:  # a KV-sharing layer's read of this layer's keys
        nodes.append(helper.make_node("Identity", [k], ["k_shared"]))
        outputs.append("k_shared")
    rng = np.random.default_rng(1)
    inits = [
        onnx.numpy_helper.from_array(np.array([B, S, h, D], np.int64), f"shape_{h}") for h in {HQ, HKV}
    ] + [onnx.numpy_helper.from_array(np.array([B, S, HQ * D], np.int64), "shape_out")]
    for name in "qk":
        inits.append(onnx.numpy_helper.from_array((rng.random(D) + 0.5).astype(np.float32), f"w_{name}"))
    inits.append(onnx.numpy_helper.from_array(np.ones(D, np.float32), "w_v"))
    inputs = [
        helper.make_tensor_value_info("q_raw", F, [B, S, HQ * D]),
        helper.make_tensor_value_info("k_raw", F, [B, S, HKV * D]),
        helper.make_tensor_value_info("v_raw", F, [B, S, HKV * D]),
        helper.make_tensor_value_info("past_k", F, [B, HKV, C, D]),
        helper.make_tensor_value_info("past_v", F, [B, HKV, C, D]),
        helper.make_tensor_value_info("past_len", I64, [B]),
        helper.make_tensor_value_info("seq_len", I64, [B]),
        helper.make_tensor_value_info("ids", I64, [B, S]),
        helper.make_tensor_value_info("cos", F, [B * S, D // 2]),
        helper.make_tensor_value_info("sin", F, [B * S, D // 2]),
    ]
    graph = helper.make_graph(
        nodes, "layer", inputs, [helper.make_tensor_value_info(o, F, None) for o in outputs], inits
    )
    opsets = [helper.make_opsetid(d, v) for d, v in (("", 20), ("com.microsoft", 1), (KERNEL_DOMAIN, 1))]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _feeds(S: int, past_len: list[int], seq_len: list[int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    angles = rng.random((B * S, D // 2)).astype(np.float32) * 6
    return {
        "q_raw": rng.standard_normal((B, S, HQ * D), np.float32),
        "k_raw": rng.standard_normal((B, S, HKV * D), np.float32),
        "v_raw": rng.standard_normal((B, S, HKV * D), np.float32),
        "past_k": rng.standard_normal((B, HKV, C, D), np.float32),
        "past_v": rng.standard_normal((B, HKV, C, D), np.float32),
        "past_len": np.array(past_len),
        "seq_len": np.array(seq_len),
        "ids": np.arange(B * S).reshape(B, S),
        "cos": np.cos(angles),
        "sin": np.sin(angles),
    }


def _fused(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FuseAttentionInputs]:
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    ir_model = ir.serde.deserialize_model(model)
    fuse = FuseAttentionInputs()
    fuse(ir_model)
    RemoveUnusedNodesPass()(ir_model)
    return ir.serde.serialize_model(ir_model), fuse


def _run(library: Path, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})


@pytest.mark.parametrize(
    "S,past_len,seq_len,k_eq_v",
    [
        pytest.param(9, [0, 4], [9, 7], False, id="prompt-past-the-window"),
        pytest.param(1, [11, 3], [1, 1], False, id="decode-wrapped-ring"),
        pytest.param(9, [2, 0], [9, 5], True, id="k-eq-v"),
    ],
)
def test_the_fused_layer_computes_what_its_nodes_did(library, S, past_len, seq_len, k_eq_v):
    model = _model(S, k_eq_v)
    fused, fuse = _fused(model)
    assert (fuse.fused, fuse.kv_raw) == (1, 1)
    assert [n.op_type for n in fused.graph.node] == ["Reshape", "Reshape", *(["Reshape"] * (not k_eq_v)),
                                                     "NormRopeAttention", "Reshape"]  # fmt: skip
    feeds = _feeds(S, past_len, seq_len)
    want, got = _run(library, model, feeds), _run(library, fused, feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    for g, w in zip(got[1:], want[1:]):  # cache rows: the normed and rotated keys, the normed values
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_keys_another_layer_reads_stay_outside(library):
    """A layer whose keys a KV-sharing layer also reads fuses its query only (kv_raw 0), same values."""
    model = _model(9, k_read_elsewhere=True)
    fused, fuse = _fused(model)
    assert (fuse.fused, fuse.kv_raw) == (1, 0)
    assert "RotaryEmbedding" in {n.op_type for n in fused.graph.node}  # the keys' rotation stays
    feeds = _feeds(9, [0, 4], [9, 7])
    for g, w in zip(_run(library, fused, feeds), _run(library, model, feeds)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_another_rotation_is_left_alone():
    """Interleaved halves are not what the kernel rotates: the layer keeps its nodes."""
    model = _model(9)
    for node in model.graph.node:
        if node.op_type == "RotaryEmbedding":
            node.attribute[0].i = 1  # interleaved
    fused, fuse = _fused(model)
    assert fuse.fused == 0 and "NormRopeAttention" not in {n.op_type for n in fused.graph.node}
