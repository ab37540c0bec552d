"""`gemma4::SlidingWindowAttention` with its optional 8th input `block_ids` (26B/31B image blocks): the mask
rule written out as a loop, the torch reference against it, and the ONNX function body against the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma4_compile.export.custom_ops import attention
from gemma4_compile.model import ops
from tests.export.test_custom_ops import _run_single_node


def _rule(past_len: int, seq_len: int, C: int, S: int, W: int, blk: list[int]) -> np.ndarray:
    """The shared doc's rule, one key at a time: window AND (k_pos <= q_pos OR (blk[q] == blk[k] >= 0))."""
    slots = [past_len - 1 - ((past_len - 1 - j) % C) for j in range(C)]
    keys = [(p, p >= 0, -1) for p in slots] + [(past_len + s, s < seq_len, blk[s]) for s in range(S)]
    out = np.zeros((S, C + S), bool)
    for s in range(S):
        q = past_len + s
        for i, (k, valid, kb) in enumerate(keys):
            same = W > 0 and blk[s] >= 0 and kb == blk[s]
            out[s, i] = valid and (k <= q or same) and (W == 0 or k > q - W)
    return out


BLOCKS = [-1, -1, 0, 0, 0, 0, -1, 1, 1, 1, -1, -1]  # two image runs in a 12-token call


@pytest.mark.parametrize(
    "past_len,W", [(0, 3), (7, 3), (7, 5), (2, 0)], ids=["fresh", "wrapped", "W5", "global"]
)
def test_reference_mask_is_the_rule(past_len, W):
    S, C = len(BLOCKS), W or 40
    blk = torch.tensor([BLOCKS])
    got, _ = ops.attention_mask(torch.tensor([past_len]), torch.tensor([S - 1]), C, S, W, blk)
    np.testing.assert_array_equal(got[0].numpy(), _rule(past_len, S - 1, C, S, W, BLOCKS))
    if W:  # the rule differs from plain causal where a block sees its later tokens
        causal, _ = ops.attention_mask(torch.tensor([past_len]), torch.tensor([S - 1]), C, S, W)
        assert (got & ~causal).any()


def _feeds(B, Hq, Hkv, S, C, D, past_len, seq_len, blocks, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, S, D, generator=g) for h in (Hq, Hkv, Hkv))
    past_k, past_v = (torch.randn(B, Hkv, C, D, generator=g) for _ in range(2))
    args = (q, k, v, past_k, past_v, torch.tensor(past_len), torch.tensor(seq_len), torch.tensor(blocks))
    return args, {n: t.numpy() for n, t in zip(("q", "k", "v", "pk", "pv", "pl", "sl", "blk"), args)}


@pytest.mark.parametrize(
    "B,Hq,Hkv,S,C,D,W,past_len,seq_len,blocks",
    [
        pytest.param(1, 4, 2, 12, 3, 16, 3, [0], [12], [BLOCKS], id="prefill-window-inside-blocks"),
        pytest.param(
            2, 4, 1, 12, 5, 16, 5, [6, 0], [12, 9], [BLOCKS, BLOCKS[::-1]], id="padded-wrapped-ring"
        ),
        pytest.param(1, 4, 2, 12, 20, 16, 0, [3], [12], [BLOCKS], id="global-ignores-blocks"),
        pytest.param(2, 4, 2, 1, 5, 16, 5, [9, 2], [1, 1], [[-1], [-1]], id="decode"),
    ],
)
def test_block_body_matches_reference(B, Hq, Hkv, S, C, D, W, past_len, seq_len, blocks):
    args, feeds = _feeds(B, Hq, Hkv, S, C, D, past_len, seq_len, blocks)
    ref = ops.attention_reference(*args[:7], W, 1.0, args[7])
    got = _run_single_node(
        "SlidingWindowAttention", attention.function(True), feeds, ["q", "pk", "pv"], window=W, scale=1.0
    )
    valid = (torch.arange(S)[None, :] < args[6][:, None]).numpy()  # padded query rows are don't-care
    np.testing.assert_allclose(
        np.transpose(got[0], (0, 2, 1, 3))[valid], ref[0].permute(0, 2, 1, 3).numpy()[valid], atol=1e-5
    )
    np.testing.assert_array_equal(got[1], ref[1].numpy())
    causal = ops.attention_reference(*args[:7], W, 1.0)[0]
    differs = float((ref[0] - causal).abs().max())
    assert differs > 1e-2 if W and S > 1 else differs == 0.0  # the input matters exactly where it should


def test_without_block_ids_the_body_is_todays():
    """Exports without image blocks (E2B/E4B, text-only 26B/31B) keep the 7-input body, byte for byte."""
    plain = attention.function()
    assert [i for i in plain.input] == ["q", "k", "v", "past_k", "past_v", "past_len", "seq_len"]
    assert attention.body() == attention.body(block_ids=False)
    assert "block_ids" not in attention.body()
    assert list(attention.function(True).input)[-1] == "block_ids"
    same = attention.body(block_ids=True).replace(", block_ids)", ")", 1)
    assert same.replace(attention.BLOCKS, "").replace("(ko3, seen)", "(ko3, causal)") == attention.body()
