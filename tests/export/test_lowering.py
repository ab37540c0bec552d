"""The optional onnxruntime lowering (gemma4::SlidingWindowAttention -> com.microsoft.GroupQueryAttention)
computes what the function-body export computes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from gemma4_compile.errors import ExportError, Gemma4CompileError
from gemma4_compile.export import ExportManifest, export_checkpoint
from gemma4_compile.runners.ort import OrtRunner

ATOL = 1e-4  # both paths are fp32; observed ~7e-6


@pytest.mark.parametrize("preset", ["tiny-e2b", "tiny-26b-a4b"])  # KV sharing + PLE; K=V + MoE
def test_gqa_lowering_matches_the_function_body_path(make_export, preset):
    lowered, plain = OrtRunner(make_export(preset, lowering="gqa")), OrtRunner(make_export(preset))
    W = plain.spec.sliding_window
    ids = np.random.default_rng(7).integers(3, plain.spec.vocab_size, (2, 3 * W + 3))
    lengths = np.array([3 * W + 3, W + 1])
    a, b = lowered.logits(ids, lengths), plain.logits(ids, lengths)
    for row, n in enumerate(lengths):
        assert np.abs(a[row, :n] - b[row, :n]).max() <= ATOL
    np.testing.assert_array_equal(
        lowered.generate(ids, 2 * W + 3, lengths), plain.generate(ids, 2 * W + 3, lengths)
    )
    # chunked prefill on a wrapped ring (batch 1), then decode
    state_a, state_b = lowered.start(1, 6 * W), plain.start(1, 6 * W)
    for chunk in (ids[:1, : 2 * W], ids[:1, 2 * W :]):
        n = np.array([chunk.shape[1]])
        assert np.abs(lowered.step(state_a, chunk, n) - plain.step(state_b, chunk, n)).max() <= ATOL


def test_lowered_graph_uses_group_query_attention(make_export):
    path = make_export("tiny-e2b", lowering="gqa")
    assert ExportManifest.load(path).lowering == "gqa"
    model = onnx.load(str(path / "decoder.onnx"), load_external_data=False)
    (fn,) = [f for f in model.functions if f.name == "SlidingWindowAttention"]
    assert [n.op_type for n in fn.node if n.domain == "com.microsoft"] == ["GroupQueryAttention"]
    windows = {
        n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        for n in model.graph.node
        if n.op_type == "SlidingWindowAttention"
    }
    assert sorted({w["local_window_size"] for w in windows.values()}) == [-1, 8]
    assert all(w["plugin_namespace"] == b"gemma4" for w in windows.values())


def test_batched_prefill_on_a_filled_cache_is_refused_clearly(make_export):
    runner = OrtRunner(make_export("tiny-e2b", lowering="gqa"))
    state = runner.start(2, 64)
    runner.step(state, np.ones((2, 4), dtype=np.int64), np.array([4, 4]))
    with pytest.raises(Gemma4CompileError, match="gqa-lowered export cannot prefill a batch"):
        runner.step(state, np.ones((2, 3), dtype=np.int64), np.array([3, 3]))


def test_unknown_lowering(make_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="unknown lowering 'mha'"):
        export_checkpoint(make_checkpoint("tiny-31b"), tmp_path / "x", lowering="mha")
