"""What the tests of our onnxruntime CPU kernels (runners/ort_kernels) share: the built library, and a session
running one kernel node."""

from __future__ import annotations

from pathlib import Path

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
