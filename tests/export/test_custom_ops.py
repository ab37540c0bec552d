"""Each `gemma4` function body, run by onnxruntime, against the torch reference in model/ops.py."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from gemma4_compile.export.custom_ops import attention, moe
from gemma4_compile.model import ops
from gemma4_compile.ops.onnx_domain import plugin_attributes


def _run_single_node(
    op_type, fn, inputs: dict[str, np.ndarray], out_like: list[str], **attrs
) -> list[np.ndarray]:
    names = list(inputs)
    outs = [f"y{i}" for i in range(len(out_like))]
    node = helper.make_node(op_type, names, outs, domain="gemma4", **attrs, **plugin_attributes())
    dt = {np.float32: TensorProto.FLOAT, np.int64: TensorProto.INT64}
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, dt[a.dtype.type], list(a.shape)) for n, a in inputs.items()],
        [
            helper.make_tensor_value_info(o, TensorProto.FLOAT, list(inputs[n].shape))
            for o, n in zip(outs, out_like)
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("gemma4", 1)], functions=[fn]
    )
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


ATTENTION_CASES = [
    # (B, Hq, Hkv, S, C, D, W, past_len, seq_len)
    pytest.param(1, 4, 2, 20, 5, 16, 5, [0], [20], id="prefill-3W-sliding"),
    pytest.param(2, 8, 1, 7, 5, 16, 5, [3, 11], [7, 4], id="prefill-padded-wrapped-ring"),
    pytest.param(2, 4, 4, 1, 8, 32, 8, [13, 2], [1, 1], id="decode-wrapped-ring"),
    pytest.param(2, 8, 1, 6, 40, 32, 0, [0, 9], [6, 2], id="global-padded"),
    pytest.param(1, 4, 2, 1, 40, 32, 0, [33], [1], id="global-decode"),
    pytest.param(3, 4, 2, 1, 8, 16, 8, [13, 2, 7], [1, 0, 1], id="decode-idle-row"),  # row 1 writes nothing
    pytest.param(2, 4, 2, 1, 12, 16, 5, [20, 3], [1, 1], id="decode-ring-wider-than-window"),
]
# the export's body, and the one the onnxruntime runner swaps in (one-token calls scatter their cache row)
BODIES = {
    "export": attention.function,
    "ort-decode-ring": lambda: attention.decode_ring(attention.function()),
}


@pytest.mark.parametrize("form", list(BODIES))
@pytest.mark.parametrize("B,Hq,Hkv,S,C,D,W,past_len,seq_len", ATTENTION_CASES)
def test_attention_body_matches_reference(form, B, Hq, Hkv, S, C, D, W, past_len, seq_len):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, S, D, generator=g) for h in (Hq, Hkv, Hkv))
    past_k, past_v = (torch.randn(B, Hkv, C, D, generator=g) for _ in range(2))
    pl, sl = torch.tensor(past_len), torch.tensor(seq_len)
    ref = ops.attention_reference(q, k, v, past_k, past_v, pl, sl, W, 1.0)
    feeds = {
        n: t.numpy()
        for n, t in zip(("q", "k", "v", "pk", "pv", "pl", "sl"), (q, k, v, past_k, past_v, pl, sl))
    }
    got = _run_single_node(
        "SlidingWindowAttention", BODIES[form](), feeds, ["q", "pk", "pv"], window=W, scale=1.0
    )
    valid = (torch.arange(S)[None, :] < sl[:, None]).numpy()  # padded query rows are don't-care
    np.testing.assert_allclose(
        np.transpose(got[0], (0, 2, 1, 3))[valid],
        ref[0].permute(0, 2, 1, 3).numpy()[valid],
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_array_equal(got[1], ref[1].numpy())
    np.testing.assert_array_equal(got[2], ref[2].numpy())


@pytest.mark.parametrize(
    "T,H,I,E,K", [(1, 16, 8, 8, 1), (7, 16, 8, 8, 2), (12, 32, 16, 16, 4), (5, 16, 8, 128, 8)]
)
def test_moe_body_matches_reference(T, H, I, E, K):  # noqa: E741
    g = torch.Generator().manual_seed(1)
    x, logits = torch.randn(T, H, generator=g), torch.randn(T, E, generator=g) * 3
    scale = torch.rand(E, generator=g) + 0.5
    gate_up, down = torch.randn(E, 2 * I, H, generator=g) / 4, torch.randn(E, H, I, generator=g) / 4
    ref = ops.moe_reference(x, logits, scale, gate_up, down, K)
    feeds = {n: t.numpy() for n, t in zip(("x", "r", "s", "gu", "dn"), (x, logits, scale, gate_up, down))}
    (got,) = _run_single_node("MoE", moe.function(), feeds, ["x"], top_k=K)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_wrong_window_is_detected():
    """The comparison above can fail: a body run with W+1 differs from the W reference."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=g) for _ in range(3))
    past = torch.zeros(1, 2, 4, 16)
    pl, sl = torch.tensor([0]), torch.tensor([12])
    ref = ops.attention_reference(q, k, v, past, past, pl, sl, 4, 1.0)[0].numpy()
    feeds = {
        n: t.numpy() for n, t in zip(("q", "k", "v", "pk", "pv", "pl", "sl"), (q, k, v, past, past, pl, sl))
    }
    got = _run_single_node(
        "SlidingWindowAttention", attention.function(), feeds, ["q", "pk", "pv"], window=5, scale=1.0
    )[0]
    assert np.abs(got - ref).max() > 1e-2


def test_an_unregistered_gemma4_op_is_a_one_line_export_error(tmp_path):
    from gemma4_compile.errors import ExportError
    from gemma4_compile.export.exporter import _custom_nodes
    from gemma4_compile.model.presets import PRESETS

    model = onnx.parser.parse_model("""
    <ir_version: 10, opset_import: ["" : 20, "gemma4" : 1]>
    g (float[2, 4] x) => (float[2, 4] y) { y = gemma4.RotaryEmbedding (x) }
    """)
    onnx.save(model, tmp_path / "decoder.onnx")
    with pytest.raises(
        ExportError, match="unregistered custom op: no gemma4 op named 'RotaryEmbedding'; known: "
    ):
        _custom_nodes(tmp_path / "decoder.onnx", PRESETS["tiny-e2b"])
