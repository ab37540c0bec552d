"""OrtRunner's reused IO bindings (runners/ort_binding.py): the same bits as numpy feeds, no cache moved per step."""

from __future__ import annotations

import numpy as np
import pytest

from gemma4_compile.runners.ort import OrtRunner
from gemma4_compile.validate.reference import TorchRunner


@pytest.fixture(scope="module")
def runners(make_export):
    cache = {}

    def get(preset):
        if preset not in cache:
            export = make_export(preset)
            cache[preset] = OrtRunner(export, io_binding=False), OrtRunner(export)
        return cache[preset]

    return get


def test_bound_decode_is_bitwise_the_numpy_path_and_the_reference_tokens(
    runners, make_checkpoint, tiny_preset
):
    plain, bound = runners(tiny_preset)
    assert plain._bound is None and bound._bound is not None
    W = bound.spec.sliding_window
    ids = np.random.default_rng(3).integers(3, bound.spec.vocab_size, (2, 2 * W + 3))
    lengths = np.array([2 * W + 3, W + 1])  # right padding on row 1; both rows wrap their rings
    steps = 2 * W + 2
    tokens, logits = bound.generate_with_logits(ids, steps, lengths)
    want_tokens, want_logits = plain.generate_with_logits(ids, steps, lengths)
    np.testing.assert_array_equal(logits, want_logits)  # bitwise: same graph, same kernels
    np.testing.assert_array_equal(tokens, want_tokens)
    torch_tokens = TorchRunner(make_checkpoint(tiny_preset)).generate(ids[:1], steps)
    np.testing.assert_array_equal(tokens[:1], torch_tokens)


@pytest.mark.parametrize("kernels", [False, True])
def test_decode_steps_reuse_their_cache_sets_and_bindings(runners, make_export, kernels):
    """Bodies: two sets taking turns. Our attention kernel: one-token steps write the set they read."""
    bound = runners("tiny-e2b")[1] if kernels else OrtRunner(make_export("tiny-e2b"), kernels=False)
    assert bound._bound.in_place == kernels or bound.kernels.startswith("unavailable")
    state = bound.start(1, 40)
    bound.step(state, np.array([[5, 6, 7]]), np.array([3]))
    seen, bindings = [], state.extra["io"]
    for t in range(6):
        bound.step(state, np.array([[8 + t]]), np.array([1]))
        seen.append({id(v) for v in state.caches.values()})
    # built once per call length (3 and 1) and reused: the state keeps the same bindings
    assert state.extra["io"] is bindings and len(bindings.calls) == 2
    assert seen[0] == seen[2] == seen[4] and seen[1] == seen[3] == seen[5]
    assert (seen[0] == seen[1]) == bound._bound.in_place  # one set, or two that never share a buffer
    assert bound._bound.in_place or not seen[0] & seen[1]


def test_caches_sliced_by_the_caller_are_adopted(runners):
    """The batching engine drops and joins rows by slicing state.caches: the next call binds the new arrays."""
    plain, bound = runners("tiny-e2b")
    ids = np.random.default_rng(4).integers(3, bound.spec.vocab_size, (3, 12))
    out = []
    for r in (plain, bound):
        state = r.start(3, 30)
        r.step(state, ids, np.full(3, 12))
        keep = np.array([0, 2])
        state.caches = {k: v[keep] for k, v in state.caches.items()}
        state.past_len = state.past_len[keep]
        out.append([r.step(state, np.array([[9], [10]]), np.ones(2, np.int64)) for _ in range(3)])
    np.testing.assert_array_equal(np.stack(out[0]), np.stack(out[1]))


def test_session_cache_writes_the_optimized_decoder_once_and_computes_the_same_bits(
    runners, make_export, tmp_path
):
    plain, _ = runners("tiny-26b-a4b")
    export = make_export("tiny-26b-a4b")
    first = OrtRunner(export, session_cache=tmp_path)
    (entry,) = [p for p in tmp_path.iterdir()]  # one entry: the decoder, keyed by its sha256
    graph = entry / "model.onnx"
    stamp = graph.stat().st_mtime_ns
    second = OrtRunner(export, session_cache=tmp_path)
    assert graph.stat().st_mtime_ns == stamp and [p for p in tmp_path.iterdir()] == [entry]
    ids = np.random.default_rng(6).integers(3, plain.spec.vocab_size, (1, 40))
    want = plain.generate_with_logits(ids, 6)[1]
    for runner in (first, second):
        np.testing.assert_array_equal(runner.generate_with_logits(ids, 6)[1], want)


def test_only_the_decoder_session_gets_the_threads(make_export):
    """The embed graph gathers rows: a pool of its own spun against the decoder on a 2-core machine."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    runner = OrtRunner(make_export("tiny-e2b"), threads=2, options=options)
    threads = {role: s.get_session_options().intra_op_num_threads for role, s in runner.sessions.items()}
    assert threads == {"embed": 1, "decoder": 2}
    assert options.intra_op_num_threads == 2  # the caller's options are left as they were
