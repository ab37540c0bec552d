"""`gemma4_ort::SlidingWindowAttention` (runners/ort_kernels/attention.cc) against the export's function body run
by onnxruntime (standard ops) and the torch reference, on prompts longer than the window, wrapped rings, padded
and idle rows, GQA, global layers and image blocks; the kernel form of a decoder keeps the runner's tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from kernel_support import assert_same_tokens, built
from onnx import TensorProto, helper
from test_custom_ops import ATTENTION_CASES

from gemma4_compile.model import ops
from gemma4_compile.ops.attention import body as attention
from gemma4_compile.ops.moe.body import KERNEL_DOMAIN
from gemma4_compile.ops.onnx_domain import plugin_attributes

NAMES = ("q", "k", "v", "pk", "pv", "pl", "sl", "blk")
BLOCKS = [-1, -1, 0, 0, 0, 0, -1, 1, 1, 1, -1, -1]  # two image blocks in a 12-token prompt


@pytest.fixture(scope="module")
def library() -> Path:
    return built()


def _inputs(B, Hq, Hkv, S, C, D, past_len, seq_len, blocks=None, seed=0) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(B, h, S, D, generator=g) for h in (Hq, Hkv, Hkv)]
    tensors += [torch.randn(B, Hkv, C, D, generator=g) for _ in range(2)]
    tensors += [torch.tensor(past_len), torch.tensor(seq_len)] + ([torch.tensor(blocks)] if blocks else [])
    return {n: t.numpy() for n, t in zip(NAMES, tensors)}


def _run(feeds: dict[str, np.ndarray], W: int, library: Path | None, outputs: int = 3) -> list[np.ndarray]:
    """One attention node: the kernel (`library`) or the export's body (None), with its first `outputs` outputs."""
    names = list(feeds)
    outs = ["out", "present_k", "present_v"][:outputs]
    if library is None:
        node = helper.make_node(
            attention.OP_TYPE, names, outs, domain="gemma4", window=W, scale=1.0, **plugin_attributes()
        )
        functions = [attention.function(block_ids="blk" in feeds)]
    else:
        node = helper.make_node(attention.OP_TYPE, names, outs, domain=KERNEL_DOMAIN, window=W, scale=1.0)
        functions = []
    types = {np.float32: TensorProto.FLOAT, np.int64: TensorProto.INT64}
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, types[a.dtype.type], list(a.shape)) for n, a in feeds.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
    )
    opsets = [helper.make_opsetid(d, 1) for d in ("gemma4", KERNEL_DOMAIN)] + [helper.make_opsetid("", 20)]
    model = helper.make_model(graph, opset_imports=opsets, functions=functions, ir_version=10)
    options = ort.SessionOptions()
    if library is not None:
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options).run(None, feeds)


def _reference(feeds: dict[str, np.ndarray], W: int) -> list[np.ndarray]:
    args = [torch.from_numpy(feeds[n]) for n in NAMES[:7]]
    blocks = torch.from_numpy(feeds["blk"]) if "blk" in feeds else None
    return [t.numpy() for t in ops.attention_reference(*args, W, 1.0, blocks)]


def _check(library: Path, feeds: dict[str, np.ndarray], W: int) -> None:
    """Every output against the body (all query rows, padded ones too: the kernel keeps the body's values there),
    and the valid rows against torch; the caches are copies, so they match exactly."""
    got, body, ref = _run(feeds, W, library), _run(feeds, W, None), _reference(feeds, W)
    np.testing.assert_allclose(got[0], body[0], rtol=1e-5, atol=1e-5)
    valid = np.arange(feeds["q"].shape[2])[None, :] < feeds["sl"][:, None]
    np.testing.assert_allclose(
        got[0].transpose(0, 2, 1, 3)[valid], ref[0].transpose(0, 2, 1, 3)[valid], rtol=1e-5, atol=1e-5
    )
    for i in (1, 2):
        np.testing.assert_array_equal(got[i], body[i])
        np.testing.assert_array_equal(got[i], ref[i])


@pytest.mark.parametrize(
    "B,Hq,Hkv,S,C,D,W,past_len,seq_len",
    [*ATTENTION_CASES, pytest.param(2, 4, 2, 9, 5, 24, 5, [3, 0], [9, 6], id="head-not-a-multiple-of-16")],
)
def test_the_kernel_matches_the_body_and_the_reference(library, B, Hq, Hkv, S, C, D, W, past_len, seq_len):
    _check(library, _inputs(B, Hq, Hkv, S, C, D, past_len, seq_len), W)


@pytest.mark.parametrize(
    "B,Hq,Hkv,S,C,D,W,past_len,seq_len,blocks",
    [
        pytest.param(1, 4, 2, 12, 3, 16, 3, [0], [12], [BLOCKS], id="prefill-window-inside-blocks"),
        pytest.param(2, 4, 1, 12, 5, 16, 5, [6, 0], [12, 9], [BLOCKS, BLOCKS[::-1]], id="padded-wrapped"),
        pytest.param(1, 4, 2, 12, 20, 16, 0, [3], [12], [BLOCKS], id="global-ignores-blocks"),
    ],
)
def test_image_blocks_see_themselves_on_sliding_layers(
    library, B, Hq, Hkv, S, C, D, W, past_len, seq_len, blocks
):
    _check(library, _inputs(B, Hq, Hkv, S, C, D, past_len, seq_len, blocks), W)


def test_a_row_that_sees_nothing_gets_the_bodys_mean_of_values(library):
    """An empty row (nothing cached, no new token): the body's softmax over equal scores, kept by the kernel."""
    feeds = _inputs(2, 4, 2, 3, 6, 16, [0, 4], [0, 3])
    np.testing.assert_allclose(_run(feeds, 4, library)[0], _run(feeds, 4, None)[0], rtol=1e-5, atol=1e-6)


def test_long_calls_split_over_threads_with_the_same_values(library):
    """A call above the serial threshold (kSerialWork) runs on the intra-op threads: the same values."""
    feeds = _inputs(2, 8, 2, 70, 24, 64, [5, 40], [70, 61], seed=3)
    _check(library, feeds, 24)


def test_a_wrong_window_is_detected(library):
    """The comparison can fail: the kernel at W + 1 differs from the W body."""
    feeds = _inputs(1, 4, 2, 20, 5, 16, [0], [20])
    assert np.abs(_run(feeds, 6, library)[0] - _run(feeds, 5, None)[0]).max() > 1e-2


def test_a_node_without_the_caches_writes_only_its_output(library):
    """KV-sharing layers read another layer's cache and leave present_k / present_v out."""
    feeds = _inputs(1, 4, 2, 1, 8, 16, [13], [1])
    (out,) = _run(feeds, 8, library, outputs=1)
    np.testing.assert_allclose(out, _run(feeds, 8, None)[0], rtol=1e-5, atol=1e-5)


def test_inconsistent_shapes_are_refused(library):
    feeds = _inputs(1, 4, 2, 3, 8, 16, [2], [3])
    feeds["pv"] = feeds["pv"][:, :, :4]
    with pytest.raises(Exception, match="SlidingWindowAttention: inconsistent shapes"):
        _run(feeds, 8, library)


def test_the_portable_build_matches(library):
    """Without AVX-512 (the scalar exp in the softmax), the same values to the tolerance."""
    portable = built("-DGEMMA4_PORTABLE")
    feeds = _inputs(2, 8, 1, 7, 5, 16, [3, 11], [7, 4])
    np.testing.assert_allclose(_run(feeds, 5, portable)[0], _run(feeds, 5, library)[0], rtol=1e-5, atol=1e-6)


def test_the_runner_runs_every_layer_on_the_kernel_with_the_same_tokens(library, make_export):
    """tiny-e2b fp32 (KV sharing, sliding and global layers): a ragged batch of two prompts past the sliding
    window, then one-token steps, against the same export run on the bodies; the layers that read another layer's
    cache leave theirs out."""
    from gemma4_compile.passes.share_shapes import shared_decoder
    from gemma4_compile.runners.ort import OrtRunner, all_nodes

    export = make_export("tiny-e2b")
    with_kernel, without = OrtRunner(export), OrtRunner(export, kernels=False)
    assert with_kernel.kernels == "attention"
    path = with_kernel.manifest.graph_path("decoder")
    graph = onnx.load_from_string(shared_decoder(path, attention_kernel=True)).graph
    nodes = [n for n in all_nodes(graph) if n.domain == KERNEL_DOMAIN]
    assert {n.op_type for n in nodes} == {"NormRopeAttention"}  # every layer's head norms and rotations too
    assert len(nodes) == with_kernel.spec.num_hidden_layers
    owners = sum(1 for n in nodes if len(n.output) == 3)
    assert 0 < owners < len(nodes) and all(len(n.output) in (1, 3) for n in nodes)
    assert_same_tokens(with_kernel, without)


def test_the_runner_picks_the_kernels_of_each_export(make_export):
    """fp32 exports run attention on the kernel (MoE ones their MoE kernel too); others run the bodies."""
    import dataclasses

    from gemma4_compile.dtypes import DType
    from gemma4_compile.export.manifest import ExportManifest
    from gemma4_compile.runners.ort import _kernels

    moe = ExportManifest.load(make_export("tiny-26b-a4b"))
    assert _kernels(moe) == (["attention", "moe_step"], "")
    dense = dataclasses.replace(moe, spec=dataclasses.replace(moe.spec, enable_moe_block=False))
    assert _kernels(dense) == (["attention"], "")
    assert _kernels(dataclasses.replace(moe, dtype=DType.FP16.value)) == ([], "the kernels are fp32")


def test_one_token_steps_write_the_caches_they_read(make_export):
    """With the kernel, a one-token call binds each cache as input and output (runners/ort_binding.py): no set
    flip, no copy; the tokens above stay those of the bodies, which always flip."""
    from gemma4_compile.runners.ort import OrtRunner

    runner, bodies = OrtRunner(make_export("tiny-e2b")), OrtRunner(make_export("tiny-e2b"), kernels=False)
    for r, in_place in ((runner, True), (bodies, False)):
        state = r.start(1, 40)
        r.step(state, np.array([[5] * 20]), np.array([20]))  # a prompt: two sets, as before
        before = dict(state.caches)
        r.step(state, np.array([[7]]), np.array([1]))
        assert all((state.caches[k] is v) == in_place for k, v in before.items())
