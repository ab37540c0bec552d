"""What the tests of our onnxruntime CPU kernels (runners/ort_kernels) share: the built library, a session
running one kernel node, and a runner against another on the same ragged batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from gemma4_compile.ops.moe import body
from gemma4_compile.runners import ort_kernels


def built(*flags: str) -> Path:
    """The library (fetching headers if needed) built with extra compiler `flags`; the test skips where it can't."""
    try:
        return ort_kernels.build(fetch=True, extra_flags=flags)
    except ort_kernels.KernelsUnavailable as e:
        pytest.skip(f"onnxruntime CPU kernels unavailable: {e}")


def kernel_session(library: Path, node: onnx.NodeProto, types: dict[str, int]) -> ort.InferenceSession:
    """A session of one `gemma4_ort` node whose inputs have the ONNX element `types` (by name), output y float."""
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, t, None) for n, t in types.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid(body.KERNEL_DOMAIN, 1)]
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    options.log_severity_level = 4
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def ragged_generations(runner, other, steps: int = 12) -> tuple[tuple, tuple]:
    """(tokens, logits) of both runners on a ragged batch of two prompts past the sliding window, then `steps`
    one-token steps."""
    W = runner.spec.sliding_window
    ids = np.random.default_rng(11).integers(3, runner.spec.vocab_size, (2, 3 * W + 3))
    lengths = np.array([3 * W + 3, W - 2])
    return runner.generate_with_logits(ids, steps, lengths), other.generate_with_logits(ids, steps, lengths)


def assert_same_tokens(runner, other, atol: float = 1e-4) -> None:
    """The same greedy tokens on `ragged_generations`, and logits within `atol`."""
    got, want = ragged_generations(runner, other)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=atol)
