"""Image blocks (`block_ids`, 26B/31B prompts with images) in the Triton prefill attention kernel, against
`ops.attention_reference` with the same block ids (CPU interpreter; TRITON_INTERPRET=0 on a GPU).

On a sliding layer a new query also sees the new keys of its own block, later ones included, inside the window.
The interpreter's tile is 16 packed rows (8 positions at GQA 2) x 16 keys, so the cases below put a block across
a key-tile boundary, make one longer than the window, leave a tile of plain text between two blocks (skipped in
the kernel's tail loop), run a block into right padding, and chunk a prefill behind a wrapped ring.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does it too)

import pytest
import torch

pytest.importorskip("triton", reason="the plugin kernels are Triton kernels")

from test_kernel_attention import DEVICE, make_inputs, reference

from gemma4_compile.errors import Gemma4CompileError
from gemma4_compile.plugins.kernels import attention as K

pytestmark = pytest.mark.kernel

# name: ((B, Hq, Hkv, S, C, D, window, past_len per row, seq_len per row), [(row, start, end, id), ...])
CASES = {
    # block 0 (10 tokens) is longer than the window; block 1 crosses the key tile at new token 16
    "two_blocks_one_longer_than_window": (
        (1, 4, 2, 40, 8, 16, 8, [0], [40]),
        [(0, 3, 13, 0), (0, 14, 27, 1)],
    ),
    # row 0: the tail loop skips the text tiles between the blocks; row 1: a block running into right padding
    "padding_and_text_between_blocks": (
        (2, 4, 2, 48, 16, 16, 12, [0, 0], [48, 30]),
        [(0, 2, 8, 0), (0, 40, 47, 1), (1, 22, 34, 0)],
    ),
    # chunked prefill behind a wrapped ring: cached slots have no block
    "chunk_after_wrapped_ring": ((1, 8, 1, 24, 8, 32, 8, [19], [24]), [(0, 0, 5, 0), (0, 9, 20, 1)]),
}
TOLERANCES = [(torch.float32, 5e-6, 5e-6), (torch.float16, 2e-3, 2e-3)]  # as test_kernel_attention.py


def block_inputs(name: str, dtype: torch.dtype, window: int | None = None) -> dict:
    shape, blocks = CASES[name]
    inputs = make_inputs(shape, dtype)
    B, S = inputs["q"].shape[0], inputs["q"].shape[2]
    ids = torch.full((B, S), -1, dtype=torch.int64)
    for row, start, end, block in blocks:
        ids[row, start:end] = block
    inputs["block_ids"] = ids.to(DEVICE)
    if window is not None:
        inputs["window"] = window
    return inputs


@pytest.mark.parametrize(("dtype", "atol", "rtol"), TOLERANCES)
@pytest.mark.parametrize("name", list(CASES))
def test_prefill_with_blocks_matches_reference(name, dtype, atol, rtol):
    inputs = block_inputs(name, dtype)
    out, pk, pv = K.attention(**inputs)
    want, want_k, want_v = reference(inputs)
    torch.testing.assert_close(out.float(), want, atol=atol, rtol=rtol)
    assert torch.equal(pk, want_k) and torch.equal(pv, want_v)


def test_blocks_change_the_result_the_kernel_must_not_ignore_them():
    """Negative control: the block rule really matters on these inputs, so the match above is not vacuous."""
    inputs = block_inputs("two_blocks_one_longer_than_window", torch.float32)
    out, _, _ = K.attention(**inputs)
    causal, _, _ = reference({**inputs, "block_ids": None})
    rows = inputs["block_ids"][0] >= 0
    assert (out - causal)[:, :, rows].abs().amax() > 1e-2  # block rows see later keys
    torch.testing.assert_close(out[:, :, ~rows], causal[:, :, ~rows], atol=5e-6, rtol=5e-6)  # text rows don't


def test_full_layers_ignore_blocks():
    inputs = block_inputs("two_blocks_one_longer_than_window", torch.float32, window=0)
    out, _, _ = K.attention(**inputs)
    causal, _, _ = reference({**inputs, "block_ids": None})
    torch.testing.assert_close(out, causal, atol=5e-6, rtol=5e-6)


def test_decode_step_with_a_block_is_plain_decode():
    inputs = make_inputs((2, 4, 2, 1, 8, 16, 8, [29, 7], [1, 1]), torch.float32)
    ids = torch.tensor([[0], [-1]], device=DEVICE)
    out, _, _ = K.attention(**inputs, block_ids=ids)
    want, _, _ = reference({**inputs, "block_ids": ids})
    torch.testing.assert_close(out, want, atol=5e-6, rtol=5e-6)


def test_block_ids_of_the_wrong_shape_are_one_line_errors():
    inputs = block_inputs("chunk_after_wrapped_ring", torch.float32)
    with pytest.raises(Gemma4CompileError, match=r"block_ids is \(1, 23\) torch.int64, want \(1, 24\)"):
        K.attention(**{**inputs, "block_ids": inputs["block_ids"][:, :-1]})
