"""Triton MoE kernels against `ops.route` / `ops.moe_reference` (CPU interpreter; TRITON_INTERPRET=0 on a GPU).

Outputs are compared with the reference evaluated in fp32 on the same (rounded) inputs with a per-dtype
(atol, rtol). Cases span E 8..128, top-k 1..8, tokens 1..64 and hidden/expert widths that are not tile
multiples. Experts nobody routed to hold NaN weights: a kernel that read them would return NaN.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does it too)

import pytest
import torch

pytest.importorskip("triton", reason="the plugin kernels are Triton kernels")

from gemma4_compile.errors import Gemma4CompileError
from gemma4_compile.model import ops
from gemma4_compile.plugins.kernels import moe as M

pytestmark = pytest.mark.kernel
DEVICE = "cuda" if os.environ["TRITON_INTERPRET"] == "0" and torch.cuda.is_available() else "cpu"

# (dtype, atol, rtol) against the fp32 reference: 16-bit runs round x, h and each weighted expert row once.
# Worst error seen over all cases, as a fraction of these bounds: fp32 0.08, bf16 0.47, fp16 0.17.
TOLERANCES = [
    (torch.float32, 5e-6, 5e-6),
    (torch.bfloat16, 2e-2, 2e-2),
    (torch.float16, 3e-3, 3e-3),
]

# name: (T tokens, H hidden, E experts, I expert width, K top-k)
CASES = {
    "one_token_top1": (1, 64, 8, 32, 1),
    "tiny_26b_twin": (5, 64, 8, 32, 2),
    "e128_top8_64_tokens": (64, 64, 128, 32, 8),
    "odd_widths": (17, 48, 16, 24, 4),
    "decode_batch_e32": (3, 64, 32, 32, 8),
}


def make_inputs(case: tuple, dtype: torch.dtype, seed: int = 0) -> dict:
    T, H, E, inter, top_k = case
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    # Distinct logits (multiples of 1/32, exact in bf16/fp16): top-k has no ties, whose order the contract
    # leaves open (torch.topk and the kernel may break them differently).
    logits = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]).float() / 32 - E / 64
    return dict(
        x=rnd(T, H),
        router_logits=logits.to(dtype).to(DEVICE),
        per_expert_scale=(torch.rand(E, generator=g) + 0.5).to(dtype).to(DEVICE),
        gate_up=rnd(E, 2 * inter, H, scale=H**-0.5),
        down=rnd(E, H, inter, scale=inter**-0.5),
        top_k=top_k,
    )


def reference(inputs: dict) -> torch.Tensor:
    return ops.moe_reference(**{k: (v.float() if torch.is_tensor(v) else v) for k, v in inputs.items()})


@pytest.mark.parametrize(("dtype", "atol", "rtol"), TOLERANCES)
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_moe_matches_reference(name, dtype, atol, rtol):
    inputs = make_inputs(CASES[name], dtype)
    torch.testing.assert_close(M.moe(**inputs).float(), reference(inputs), atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_moe_routing_matches_reference(name):
    """Same experts in the same order as torch.topk, weights to fp32 rounding (the router stays fp32)."""
    inputs = make_inputs(CASES[name], torch.bfloat16)
    weights, ids = M.route(inputs["router_logits"], inputs["per_expert_scale"], inputs["top_k"])
    ref_w, ref_ids = ops.route(inputs["router_logits"], inputs["per_expert_scale"], inputs["top_k"])
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(weights, ref_w, atol=1e-6, rtol=1e-6)


def test_kernel_moe_routing_breaks_ties_by_lowest_expert_id():
    logits = torch.zeros(3, 16, device=DEVICE)
    logits[1, 9] = 1.0
    weights, ids = M.route(logits, torch.ones(16, device=DEVICE), 4)
    assert ids.tolist() == [[0, 1, 2, 3], [9, 0, 1, 2], [0, 1, 2, 3]]
    torch.testing.assert_close(weights.sum(1), torch.ones(3, device=DEVICE))


@pytest.mark.parametrize("block_m", [16, 64])
def test_kernel_moe_sort_is_a_stable_counting_sort(block_m):
    """Rows grouped by expert, token order inside an expert; offsets are prefix sums of counts and tiles."""
    T, E, K = 300, 128, 8  # 2400 pairs: 19 sort blocks, so the cross-block prefix sums are exercised
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, E // 2, (T, K), generator=g, dtype=torch.int32).to(DEVICE)  # half the experts idle
    sorted_pairs, pair_rows, expert_offsets, tile_offsets = M.sort_by_expert(ids, E, block_m)
    flat = ids.reshape(-1).long()
    want = torch.sort(flat, stable=True).indices
    assert torch.equal(sorted_pairs.long(), want)
    assert torch.equal(pair_rows.long()[want], torch.arange(flat.numel(), device=DEVICE))
    counts = torch.bincount(flat, minlength=E)
    assert torch.equal(expert_offsets.long(), torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
    tiles = (counts + block_m - 1) // block_m
    assert torch.equal(tile_offsets.long(), torch.cat([tiles.new_zeros(1), tiles.cumsum(0)]))


def test_kernel_moe_never_reads_experts_nobody_picked():
    """Work follows the routed pairs: experts outside the top-k of every token may hold NaN."""
    inputs = make_inputs((6, 64, 64, 32, 2), torch.float32)
    _, ids = ops.route(inputs["router_logits"], inputs["per_expert_scale"], 2)
    idle = torch.ones(64, dtype=torch.bool)
    idle[ids.unique()] = False
    assert idle.sum() >= 50
    want = reference(inputs)
    for name in ("gate_up", "down"):
        inputs[name][idle.to(DEVICE)] = float("nan")
    torch.testing.assert_close(M.moe(**inputs), want, atol=5e-6, rtol=5e-6)


def test_kernel_moe_rejects_inconsistent_shapes():
    inputs = make_inputs(CASES["tiny_26b_twin"], torch.float32)
    with pytest.raises(Gemma4CompileError, match="down is"):
        M.moe(**{**inputs, "down": inputs["down"][:, :, :16]})
    with pytest.raises(Gemma4CompileError, match="top_k 9"):
        M.route(inputs["router_logits"], inputs["per_expert_scale"], 9)
    assert M.moe(**{**inputs, "x": inputs["x"][:0], "router_logits": inputs["router_logits"][:0]}).shape == (
        0,
        64,
    )
