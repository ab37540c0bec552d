"""`gemma4_ort::MoENBits` (runners/ort_kernels/moe_nbits.cc): 4-bit experts in MatMulNBits' layout against
references of the dequantized weights; the runner's rewrite that puts it in place of QuantizeExperts' If chain
(passes/moe_nbits.py CollapseExperts) on the tiny MoE preset, against the same export run with the chain."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from kernel_support import assert_same_tokens, built, kernel_session, ragged_generations
from onnx import TensorProto, helper

from gemma4_compile.ops.moe import body
from gemma4_compile.ops.moe.reference import moe_reference

NAMES = ("x", "r", "s", "gu", "gu_scales", "dn", "dn_scales")


@pytest.fixture(scope="module")
def library() -> Path:
    return built()


@pytest.fixture(scope="module")
def portable() -> Path:
    """The same source without the AVX-512 paths (what a CPU without VNNI builds)."""
    return built("-DGEMMA4_PORTABLE")


def _codes(E: int, N: int, K: int, B: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes [E, N, blocks, B/2], scales [E, N, blocks], the weights they encode [E, N, K])."""
    blocks = -(-K // B)
    codes = rng.integers(0, 256, (E, N, blocks, B // 2), dtype=np.uint8)
    scales = (rng.uniform(0.02, 0.08, (E, N, blocks)) * rng.choice([-1, 1], (E, N, blocks))).astype(
        np.float32
    )
    values = np.stack([codes & 0x0F, codes >> 4], -1).reshape(E, N, blocks, B).astype(np.float32) - 8
    return codes, scales, (values * scales[..., None]).reshape(E, N, blocks * B)[..., :K]


def _case(T: int, H: int, I: int, E: int, B: int, seed: int = 3):  # noqa: E741
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H), dtype=np.float32)
    logits = (rng.standard_normal((T, E)) * 3).astype(np.float32)
    pes = rng.uniform(0.5, 1.5, E).astype(np.float32)
    gu, gu_s, gu_w = _codes(E, 2 * I, H, B, rng)
    dn, dn_s, dn_w = _codes(E, H, I, B, rng)
    return (x, logits, pes, gu, gu_s, dn, dn_s), (gu_w, dn_w)


def _run(library: Path, feeds: tuple, K: int, B: int, level: int) -> np.ndarray:
    node = helper.make_node(
        "MoENBits", list(NAMES), ["y"], domain=body.KERNEL_DOMAIN, top_k=K, block_size=B, accuracy_level=level
    )
    types = {n: TensorProto.UINT8 if n in ("gu", "dn") else TensorProto.FLOAT for n in NAMES}
    sess = kernel_session(library, node, types)
    return sess.run(None, dict(zip(NAMES, feeds)))[0]


def _int8_blocks(v: np.ndarray, B: int) -> np.ndarray:
    """v rounded as accuracy level 4 rounds activations: per block of B, int8 codes of scale absmax / 127."""
    n = v.shape[-1]
    padded = np.zeros((*v.shape[:-1], -(-n // B) * B), np.float32)
    padded[..., :n] = v
    blocks = padded.reshape(*v.shape[:-1], -1, B)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0))
    codes = np.rint(blocks * inv)  # ties to even, as nearbyint
    return (codes * (amax / np.float32(127))).reshape(padded.shape)[..., :n]


def _moe_int8_activations(feeds: tuple, weights: tuple, K: int, B: int) -> np.ndarray:
    """The MoE of the dequantized experts with both matmuls' inputs rounded per block (float64 sums)."""
    x, logits, pes = feeds[:3]
    gu_w, dn_w = (w.astype(np.float64) for w in weights)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    y = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        picked = np.argsort(-probs[t], kind="stable")[:K]
        weight = probs[t, picked] / probs[t, picked].sum() * pes[picked]
        for e, w in sorted(zip(picked, weight)):
            h = gu_w[e] @ _int8_blocks(x[t], B)
            gate, up = np.split(h, 2)
            act = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3))) * up
            y[t] += (dn_w[e] @ _int8_blocks(act.astype(np.float32), B)) * w
    return y


CASES = [
    (1, 64, 32, 32),
    (5, 96, 32, 32),
    (300, 64, 32, 32),
    (7, 96, 64, 64),
    (3, 512, 256, 128),
    (1, 1056, 48, 32),
]
# T, H, I, B: 300 tokens > one chunk; H=96 at B=32 leaves a lone last sub-block; B=128 spreads each scale; one
# token with H=1056: gate_up rows of three 512-element chunks (the last a lone sub-block) stream one at a time


@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize(("T", "H", "I", "B"), CASES)
def test_moe_nbits_matches_the_dequantized_reference(library, level, T, H, I, B):  # noqa: E741
    """Level 0 against the torch MoE of the dequantized weights; level 4 against the same MoE with each matmul's
    input rounded to int8 per block. H=96 with B=64 pads the last block of x. At level 4 an activation an ulp
    from a rounding boundary (the GLU's float order differs) may round the other way: one int8 step, in a few
    outputs (<2 %), never more than 1 % of the outputs' range."""
    feeds, weights = _case(T, H, I, 8, B)
    got = _run(library, feeds, 2, B, level)
    if level == 0:
        want = moe_reference(*(torch.from_numpy(a) for a in (*feeds[:3], *weights)), 2).numpy()
    else:
        want = _moe_int8_activations(feeds, weights, 2, B)
    scale = np.abs(want).max()
    off = np.abs(got - want) > 2e-6 * scale
    if level == 0:
        assert not off.any(), np.abs(got - want).max() / scale
    else:
        assert off.mean() < 0.02 and np.abs(got - want).max() < 1e-2 * scale


@pytest.mark.parametrize("level", [0, 4])
def test_the_portable_build_computes_the_same(library, portable, level):
    feeds, _ = _case(9, 96, 64, 8, 32)
    fast, plain = (_run(lib, feeds, 3, 32, level) for lib in (library, portable))
    np.testing.assert_allclose(plain, fast, rtol=0, atol=2e-6 * np.abs(fast).max())


def test_swapped_nibbles_are_detected(library):
    """The comparison can fail: codes with their nibbles swapped give other numbers."""
    feeds, weights = _case(3, 64, 32, 8, 32)
    gu = feeds[3]
    swapped = (*feeds[:3], ((gu & 0x0F) << 4) | (gu >> 4), *feeds[4:])
    got = _run(library, swapped, 2, 32, 0)
    want = moe_reference(*(torch.from_numpy(a) for a in (*feeds[:3], *weights)), 2).numpy()
    assert np.abs(got - want).max() > 1e-2 * np.abs(want).max()


def test_inconsistent_shapes_are_refused(library):
    feeds, _ = _case(2, 64, 32, 8, 32)
    with pytest.raises(Exception, match="MoENBits: inconsistent shapes"):
        _run(library, (*feeds[:5], feeds[5][:, :, :, :8], feeds[6]), 2, 32, 0)  # down's blob halved


@pytest.mark.parametrize("level", [0, 4])
def test_the_runner_collapses_the_expert_chain_with_the_same_tokens(
    library, make_checkpoint, tmp_path, level, monkeypatch
):
    """tiny-26B-A4B int4: every MoE layer's If chain becomes one MoENBits node, and a ragged batch past the
    sliding window gives the greedy tokens and logits of the same export run with the chain (at level 4, where
    both round activations to int8, within 2 % of the logits' range, 0.1 % on average)."""
    from gemma4_compile.export import export_checkpoint
    from gemma4_compile.passes.share_shapes import shared_decoder
    from gemma4_compile.quant.formats import QuantRequest
    from gemma4_compile.runners import ort as ort_runner

    export = tmp_path / "int4"
    request = QuantRequest("int4", 32, accuracy_level=level)
    export_checkpoint(make_checkpoint("tiny-26b-a4b"), export, max_seq_len=128, quant=request)
    with_kernel = ort_runner.OrtRunner(export)
    # the same attention kernel on both sides, so that only the experts differ
    monkeypatch.setattr(ort_runner, "_moe_kernel", lambda manifest: (None, "test: the chain"))
    without = ort_runner.OrtRunner(export)
    assert with_kernel.kernels == "attention+moe_nbits" and without.kernels == "attention"
    graph = onnx.load_from_string(
        shared_decoder(with_kernel.manifest.graph_path("decoder"), moe_step=True)
    ).graph
    moe_layers = sum(p.moe for p in with_kernel.spec.layers)
    assert sum(n.op_type == "MoENBits" for n in graph.node) == moe_layers
    branches = [a.g.name for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    assert not [b for b in branches if b.startswith("expert")]  # no chain left
    assert not [
        i.name for i in graph.initializer if re.search(r"\.experts\..*\.\d+_", i.name)
    ]  # nor its views
    if level == 0:
        assert_same_tokens(with_kernel, without)
    else:  # int8 activations: a value an ulp from a rounding boundary may round the other way on each side
        got, want = ragged_generations(with_kernel, without)
        np.testing.assert_array_equal(got[0], want[0])
        diff, scale = np.abs(got[1] - want[1]), np.abs(want[1]).max()
        assert diff.mean() < 1e-3 * scale and diff.max() < 2e-2 * scale, (diff.mean(), diff.max(), scale)


def test_split_8bit_experts_keep_their_chain(make_quant_export):
    """int8 experts at level 0 are split 4-bit rows with zero points: not MoENBits' layout, so the chain stays."""
    from gemma4_compile.passes.share_shapes import shared_decoder

    export = make_quant_export("tiny-26b-a4b", "int8", 32)
    graph = onnx.load_from_string(shared_decoder(export / "decoder.onnx", moe_step=True)).graph
    branches = [a.g.name for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    assert not [n for n in graph.node if n.op_type == "MoENBits"]
    assert "expert0" in branches
