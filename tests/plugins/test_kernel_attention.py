"""Triton attention kernels against `ops.attention_reference` (CPU interpreter; TRITON_INTERPRET=0 on a GPU).

Outputs are compared with the reference evaluated in fp32 on the same (rounded) inputs, with a per-dtype
(atol, rtol); the presents must equal `ops.ring_update` bit for bit. Shapes are tiny (the interpreter runs each
program in numpy) but keep every structural case: windows that cross tiles, prompts of 3W and more, decode
on a ring that wrapped several times, GQA 1/2/8, right padding, padding rows that see no key at all.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does it too)

import pytest
import torch

pytest.importorskip("triton", reason="the plugin kernels are Triton kernels")

from gemma4_compile.errors import Gemma4CompileError
from gemma4_compile.model import ops
from gemma4_compile.plugins.kernels import attention as K

pytestmark = pytest.mark.kernel
DEVICE = "cuda" if os.environ["TRITON_INTERPRET"] == "0" and torch.cuda.is_available() else "cpu"

# (dtype, atol, rtol) against the fp32 reference. 16-bit: the kernel rounds p to the input dtype for the PV
# product and the output once. Worst error seen over all cases, as a fraction of these bounds: fp32 0.08,
# bf16 0.39, fp16 0.16 (CPU interpreter).
TOLERANCES = [
    (torch.float32, 5e-6, 5e-6),
    (torch.bfloat16, 1.5e-2, 1.5e-2),
    (torch.float16, 2e-3, 2e-3),
]

# name: (B, Hq, Hkv, S, C, D, window, past_len per row, seq_len per row)
PREFILL = {
    "window_crosses_tiles": (2, 4, 2, 37, 5, 16, 5, [0, 9], [37, 30]),
    "prompt_3W_plus_ring_overwrite": (1, 4, 2, 40, 8, 32, 8, [3], [40]),
    "global_gqa8_empty_slots": (2, 8, 1, 12, 64, 32, 0, [0, 20], [12, 7]),
    "gqa1_right_padding": (3, 4, 4, 20, 16, 16, 16, [0, 40, 5], [20, 11, 1]),
    "padding_rows_see_nothing": (2, 4, 2, 24, 4, 16, 4, [2, 0], [3, 24]),
    "chunked_prefill_global": (1, 4, 1, 9, 40, 32, 0, [25], [9]),
    "head_dim_256": (1, 2, 1, 3, 4, 256, 4, [5], [3]),
    "head_dim_512": (1, 2, 1, 2, 8, 512, 0, [6], [2]),
}
DECODE = {
    "decode_wrapped_ring": (3, 8, 4, 1, 8, 16, 8, [29, 7, 8], [1, 1, 1]),
    "decode_global_gqa8": (2, 8, 1, 1, 48, 32, 0, [47, 3], [1, 1]),
    "decode_gqa2_first_token": (2, 4, 2, 1, 16, 16, 16, [0, 15], [1, 1]),
    "decode_inactive_row": (2, 4, 2, 1, 8, 16, 8, [0, 12], [0, 1]),  # seq_len 0: nothing valid at all
}


def make_inputs(case: tuple, dtype: torch.dtype, seed: int = 0) -> dict:
    B, Hq, Hkv, S, C, D, W, past, seq = case
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    return dict(
        q=rnd(B, Hq, S, D),
        k=rnd(B, Hkv, S, D),
        v=rnd(B, Hkv, S, D),
        past_k=rnd(B, Hkv, C, D),
        past_v=rnd(B, Hkv, C, D),
        past_len=torch.tensor(past, device=DEVICE),
        seq_len=torch.tensor(seq, device=DEVICE),
        window=W,
        scale=D**-0.5,
    )


def reference(inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contract in fp32 for the output, in the input dtype for the presents (a pure copy)."""
    as32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    out, _, _ = ops.attention_reference(**as32)
    _, pk, pv = ops.attention_reference(**inputs)
    return out, pk, pv


def check(inputs: dict, got: tuple, atol: float, rtol: float) -> None:
    out, pk, pv = reference(inputs)
    torch.testing.assert_close(got[0].float(), out, atol=atol, rtol=rtol)
    assert torch.equal(got[1], pk) and torch.equal(got[2], pv), "presents differ from ops.ring_update"


@pytest.mark.parametrize(("dtype", "atol", "rtol"), TOLERANCES)
@pytest.mark.parametrize("name", list(PREFILL))
def test_kernel_attention_prefill_matches_reference(name, dtype, atol, rtol):
    inputs = make_inputs(PREFILL[name], dtype)
    check(inputs, K.attention(**inputs), atol, rtol)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), TOLERANCES)
@pytest.mark.parametrize("name", list(DECODE))
def test_kernel_attention_decode_split_and_fused_match_reference(name, dtype, atol, rtol):
    inputs = make_inputs(DECODE[name], dtype)
    check(inputs, K.attention(**inputs), atol, rtol)  # flash-decoding: split + combine + ring update
    check(inputs, K.attention(**inputs, num_splits=0), atol, rtol)  # the single fused launch (AOT path)


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_kernel_attention_decode_any_split_count(splits):
    """More splits than key tiles leaves some splits empty; the combine must ignore them."""
    inputs = make_inputs((2, 8, 2, 1, 40, 16, 0, [39, 17], [1, 1]), torch.float32)
    check(inputs, K.attention(**inputs, num_splits=splits), 5e-6, 5e-6)


def test_kernel_attention_never_reads_keys_nobody_sees():
    """Ring slots outside every query's window, empty slots and right padding hold NaN: a kernel that loaded
    them and masked afterwards would turn the output into NaN (0 * NaN), whatever its scores."""
    W, C, past, S, seq = 8, 32, 40, 20, 13
    inputs = make_inputs((1, 4, 2, S, C, 16, W, [past], [seq]), torch.float32)
    clean = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in inputs.items()}
    slot_pos = ops.slot_positions(inputs["past_len"], C)[0]
    stale = slot_pos <= past - W  # the first query (position past) sees positions > past - W only
    for name in ("past_k", "past_v"):
        inputs[name][:, :, stale.to(DEVICE)] = float("nan")
    for name in ("k", "v"):
        inputs[name][:, :, seq:] = float("nan")
    assert stale.sum() == C - W + 1
    out, _, _ = K.attention(**inputs)
    ref, _, _ = reference(clean)
    torch.testing.assert_close(out[:, :, :seq], ref[:, :, :seq], atol=5e-6, rtol=5e-6)
    # decode on a global cache with mostly empty slots
    inputs = make_inputs((1, 8, 1, 1, 64, 32, 0, [10], [1]), torch.float32)
    clean = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in inputs.items()}
    for name in ("past_k", "past_v"):
        inputs[name][:, :, 10:] = float("nan")
    for kwargs in ({}, {"num_splits": 0}):
        out, _, _ = K.attention(**inputs, **kwargs)
        torch.testing.assert_close(out, reference(clean)[0], atol=5e-6, rtol=5e-6)


def test_kernel_attention_accepts_strided_views():
    """The model hands q as a transpose of [B, S, Hq, D]; the kernel reads strides, no copy needed."""
    inputs = make_inputs((2, 4, 2, 11, 8, 16, 8, [3, 0], [11, 6]), torch.float32)
    q = inputs["q"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not q.is_contiguous()
    check({**inputs, "q": q}, K.attention(**{**inputs, "q": q}), 5e-6, 5e-6)


def test_kernel_attention_fwd_without_ring_then_in_place_ring():
    """The two-launch form for an aliased cache: attention reads the old ring (FUSE_RING off), then the
    in-place ring write; together they equal the functional op."""
    inputs = make_inputs((2, 4, 2, 6, 8, 16, 8, [13, 2], [6, 4]), torch.float32)
    out_ref, pk_ref, pv_ref = reference(inputs)
    out, no_k, no_v = K.attention_fwd(**inputs, fuse_ring=False)
    assert no_k is None and no_v is None
    torch.testing.assert_close(out, out_ref, atol=5e-6, rtol=5e-6)
    ring_k, ring_v = inputs["past_k"].clone(), inputs["past_v"].clone()
    K.ring_update(ring_k, inputs["k"], inputs["past_len"], inputs["seq_len"], out=ring_k)
    K.ring_update(ring_v, inputs["v"], inputs["past_len"], inputs["seq_len"], out=ring_v)
    assert torch.equal(ring_k, pk_ref) and torch.equal(ring_v, pv_ref)


@pytest.mark.parametrize(
    ("past", "seq", "S", "C"),
    [([0, 3], [5, 2], 5, 8), ([13, 1], [12, 7], 12, 4), ([31, 0], [1, 1], 1, 8), ([6], [9], 9, 9)],
)
def test_kernel_ring_update_copy_and_in_place(past, seq, S, C):
    """Fresh ring and aliased (in-place) ring both equal ops.ring_update; the last C new tokens win."""
    B, Hkv, D = len(past), 2, 16
    g = torch.Generator().manual_seed(1)
    ring = torch.randn(B, Hkv, C, D, generator=g).to(DEVICE)
    new = torch.randn(B, Hkv, S, D, generator=g).to(DEVICE)
    pl, sl = torch.tensor(past, device=DEVICE), torch.tensor(seq, device=DEVICE)
    want = ops.ring_update(ring, new, pl, sl)
    assert torch.equal(K.ring_update(ring, new, pl, sl), want)
    in_place = ring.clone()
    assert K.ring_update(in_place, new, pl, sl, out=in_place).data_ptr() == in_place.data_ptr()
    assert torch.equal(in_place, want)


def test_kernel_attention_rejects_unsupported_shapes():
    inputs = make_inputs((1, 4, 2, 3, 4, 16, 4, [0], [3]), torch.float32)
    with pytest.raises(Gemma4CompileError, match="head_dim 48"):
        bad = make_inputs((1, 4, 2, 3, 4, 48, 4, [0], [3]), torch.float32)
        K.attention(**bad)
    with pytest.raises(Gemma4CompileError, match="not a multiple"):
        K.attention(**{**inputs, "q": torch.zeros(1, 3, 3, 16, device=DEVICE)})
    with pytest.raises(Gemma4CompileError, match="past_k is"):
        K.attention(**{**inputs, "past_k": inputs["past_k"].to(torch.float16)})


def test_kernel_aot_config_fits_every_target():
    """The single-launch config a TensorRT AOT plugin compiles holds the GQA group and fits shared memory;
    sm75 (64 KiB, no bf16 MMA) has no tile for 256-wide heads and says so."""
    from gemma4_compile.targets import resolve_target

    with pytest.raises(Gemma4CompileError, match="no tile for head_dim 256, GQA group 1 on sm75"):
        K.aot_config(256, 1, "fp16", 1.0, resolve_target("sm75"))
    for target in map(resolve_target, ("sm80", "sm86", "sm89", "sm90", "sm100", "sm120")):
        for head_dim in (256, 512):
            for group in (1, 2, 8):
                constexprs, warps, stages = K.aot_config(head_dim, group, "bf16", 1.0, target)
                assert constexprs["BLOCK_M"] >= group and constexprs["FUSE_RING"]
                tile = {k: constexprs[k] for k in ("BLOCK_M", "BLOCK_N")}
                conf = next(c for c in K.fwd_configs(head_dim, target.name) if c.kwargs == tile)
                assert (conf.num_warps, conf.num_stages) == (warps, stages)
                assert K.fwd_shared_bytes(conf, head_dim) <= target.max_shared_bytes
