"""passes/share_shapes.py and the onnxruntime runner's use of it: masks and shape arithmetic once per call, same
logits as the graph as exported."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx.inliner
import onnx_ir as ir
import onnxruntime as ort
import pytest

from gemma4_compile.export.manifest import DECODER, ExportManifest
from gemma4_compile.passes.run import run_passes
from gemma4_compile.passes.share_shapes import inlined_with_shapes, ort_decoder_passes, shared_decoder
from gemma4_compile.runners.ort import OrtRunner

MASK_OPS = ("Range", "Mod", "LessOrEqual", "Greater", "Or")  # the attention body's position mask


def _op_counts(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in proto.graph.node)


@pytest.fixture(scope="module")
def export(make_export):
    return make_export("tiny-e2b")


@pytest.fixture(scope="module")
def graphs(export):
    """(the decoder inlined as onnxruntime would inline it, the rewritten decoder), as protos."""
    path = ExportManifest.load(export).graph_path(DECODER)
    inlined = onnx.inliner.inline_local_functions(onnx.load(path, load_external_data=False))
    return inlined, onnx.load_from_string(shared_decoder(path, fuse=False))


def test_mask_ops_exist_once_per_window_value_not_once_per_layer(export, graphs):
    inlined, shared = graphs
    manifest = ExportManifest.load(export)
    layers = manifest.spec.num_hidden_layers
    windows = len({p.window for p in manifest.spec.layers})  # sliding and global: two masks
    head_layouts = len({p.num_kv_heads for p in manifest.spec.layers})
    before, after = _op_counts(inlined), _op_counts(shared)
    for op in MASK_OPS:
        assert before[op] >= layers, op  # the premise: one copy per layer when onnxruntime inlines
        # Range: keys and queries per window, and the one-token scatter's batch and per-head-layout indices
        bound = 2 * windows + 1 + head_layouts if op == "Range" else 2 * windows
        assert after[op] <= bound, op
    assert after["Shape"] <= 4  # batch, sequence and the two cache lengths, each read once
    assert not shared.functions and sum(after.values()) < 0.6 * sum(before.values())
    assert all(n.domain in ("", "ai.onnx") for n in shared.graph.node)
    assert after["CastLike"] < before["CastLike"]  # the fp32 softmax round trip of an fp32 export is gone


def test_weights_stay_external_references(graphs):
    _, shared = graphs
    external = [t for t in shared.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(not t.raw_data for t in external)


@pytest.fixture(scope="module")
def runners(make_export, tmp_path_factory):
    """preset -> (plain, rewritten, rewritten through the session cache, the cache folder, rewritten and
    fused: the runner's default). The rewritten ones leave out our MoE kernel, whose fp32 rounding order differs
    (tests/export/test_ort_kernels.py); the default takes it where it is built."""
    made = {}

    def get(preset: str):
        if preset not in made:
            export, cache = make_export(preset), tmp_path_factory.mktemp("ort-cache")
            plain = OrtRunner(export, share_shapes=False)
            shared = OrtRunner(export, fuse=False, kernels=False)
            cached = OrtRunner(export, session_cache=cache, fuse=False, kernels=False)
            made[preset] = plain, shared, cached, cache, OrtRunner(export, session_cache=cache)
        return made[preset]

    return get


@pytest.mark.parametrize("preset", ["tiny-e2b", "tiny-26b-a4b"])  # the MoE body has a Loop (its casts go too)
def test_rewritten_sessions_decode_the_plain_graphs_logits_past_the_window(runners, preset):
    plain, shared, cached, _, fused = runners(preset)
    W = plain.spec.sliding_window
    ids = np.random.default_rng(7).integers(3, plain.spec.vocab_size, (2, 3 * W + 5))
    lengths = np.array([3 * W + 5, 2 * W + 1])  # both rings wrap; row 1 right-padded
    steps = W + 3
    want_tokens, want = plain.generate_with_logits(ids, steps, lengths)
    for runner in (shared, cached):
        tokens, logits = runner.generate_with_logits(ids, steps, lengths)
        np.testing.assert_allclose(logits, want, rtol=0, atol=1e-6)  # only integer work is shared
        np.testing.assert_array_equal(tokens, want_tokens)
    # the fused norms and rotations (ort_fusions.py) move float results by ulps: logits within the fp32 gate's
    # own tolerance of the graph as exported, same tokens (validate checks them against PyTorch too)
    tokens, logits = fused.generate_with_logits(ids, steps, lengths)
    np.testing.assert_allclose(logits, want, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(tokens, want_tokens)


def test_session_cache_keeps_rewritten_and_plain_graphs_apart(export, runners):
    _, _, _, cache, _ = runners("tiny-e2b")
    OrtRunner(export, share_shapes=False, session_cache=cache)
    entries = sorted(p.name for p in cache.iterdir())  # plain, rewritten, rewritten and fused
    assert len(entries) == 3 and sum("-shared" in e for e in entries) == 2
    assert sum("-fused-" in e for e in entries) == 1
    reused = OrtRunner(export, session_cache=cache)  # a second start loads the saved entry
    assert len(list(cache.iterdir())) == 3 and reused.sessions[DECODER] is not None


SMALL = """
<ir_version: 10, opset_import: ["" : 20]>
g (float[batch, seq, 4] x, float[batch, seq, 4] y, int64[n] ids) => (int64[2] a, int64[2] b, int64[1] c, float[N] z)
{
  x2 = Relu (x)
  y2 = Neg (y)
  a = Shape <start = -2> (x2)
  s = Shape <start = 1, end = 3> (y2)
  b = Identity (s)
  m1 = Constant <value_ints = [-1]> ()
  flat = Reshape (x2, m1)
  c = Shape <end = 1> (ids)
  zc = Cast <to = 1> (flat)
  zl = CastLike (zc, x)
  z = Relu (zl)
}
"""


def test_shape_reads_point_at_graph_inputs_and_unknown_dims_are_left():
    proto = inlined_with_shapes(onnx.parser.parse_model(SMALL))
    model = run_passes(ir.serde.deserialize_model(proto), ort_decoder_passes())
    shapes = [n for n in model.graph if n.op_type == "Shape"]
    reads = sorted(
        (n.inputs[0].name, n.attributes.get_int("start"), n.attributes.get_int("end")) for n in shapes
    )
    # a and b both read [seq, 4] -> one Shape of x (axis 1) and a constant, shared; c reads `n`, which only ids has
    assert reads == [("ids", None, 1), ("x", 1, 2)]
    assert model.graph.outputs[0].producer() is model.graph.outputs[1].producer().inputs[0].producer()
    # the casts of float to float are gone
    assert not [n for n in model.graph if n.op_type in ("Cast", "CastLike")]
    sess_in = {
        "x": np.ones((2, 3, 4), np.float32),
        "y": np.ones((2, 3, 4), np.float32),
        "ids": np.zeros(5, np.int64),
    }
    got = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, sess_in)
    assert [g.tolist() for g in got[:3]] == [[3, 4], [3, 4], [5]] and got[3].shape == (24,)
