"""Fold small all-constant subgraphs into Constant nodes before the TensorRT parser sees the graph.

TensorRT-RTX 1.7's parser wants some inputs as build-time constants (ReduceMean's `axes`, for one) and does
not fold every constant subgraph itself: `ReduceMean(x, Reshape(Constant, Constant))` is rejected with
"Axis input must resolve to a build-time constant". Only nodes whose inputs all come from Constant nodes are
evaluated (with onnx's reference evaluator), and only when the result is small, so no weight is ever read;
the model's numbers do not change. Functions are left alone: the parser inlines them with their own scope.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MAX_ELEMENTS = 4096  # axes, shapes and scalars; never activations or weights
_NEVER = {"Constant", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.ref_attr_name:
        return None
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name in ("value_int", "value_float", "value_ints", "value_floats"):
        dtype = np.int64 if "int" in attr.name else np.float32
        return np.asarray(helper.get_attribute_value(attr), dtype=dtype)
    return None


def _evaluate(node: onnx.NodeProto, values: list[np.ndarray], opset: int) -> list[np.ndarray] | None:
    from onnx.reference import ReferenceEvaluator

    inputs = [
        helper.make_tensor_value_info(f"i{k}", onnx.TensorProto.UNDEFINED, None) for k in range(len(values))
    ]
    outputs = [
        helper.make_tensor_value_info(f"o{k}", onnx.TensorProto.UNDEFINED, None)
        for k in range(len(node.output))
    ]
    single = helper.make_node(node.op_type, [f"i{k}" for k in range(len(values))],
                              [f"o{k}" for k in range(len(node.output))], domain=node.domain)  # fmt: skip
    single.attribute.extend(node.attribute)
    graph = helper.make_graph([single], "fold", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        return list(ReferenceEvaluator(model).run(None, {f"i{k}": v for k, v in enumerate(values)}))
    except Exception:  # an op the evaluator cannot run stays in the graph for TensorRT to judge
        return None


def fold_constant_subgraphs(model: onnx.ModelProto) -> int:
    """Replace, in place, main-graph nodes computed only from small Constants by Constants. -> nodes folded."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 20)
    known: dict[str, np.ndarray] = {}
    folded = 0
    for node in model.graph.node:
        value = _constant_value(node)
        if value is not None:
            if value.size <= MAX_ELEMENTS:
                known[node.output[0]] = value
            continue
        if (node.domain not in ("", "ai.onnx") or node.op_type in _NEVER or not node.input
                or not all(name in known for name in node.input)):  # fmt: skip
            continue
        results = _evaluate(node, [known[name] for name in node.input], opset)
        if (
            results is None
            or any(np.asarray(r).size > MAX_ELEMENTS for r in results)
            or len(node.output) != 1
        ):
            continue
        out_name = node.output[0]
        result = np.asarray(results[0])
        node.CopyFrom(helper.make_node("Constant", [], [out_name], name=node.name,
                                       value=numpy_helper.from_array(result, out_name)))  # fmt: skip
        known[out_name] = result
        folded += 1
    return folded
