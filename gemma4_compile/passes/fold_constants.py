"""Fold small all-constant nodes into Constants, so that TensorRT's parser sees build-time constants.

torch.onnx (optimize=False, the weights live on the meta device) leaves `Reshape(Constant, Constant)` feeding
ReduceMean's axes and `Cast(Constant)` scalars, and TensorRT-RTX's parser does not fold every such subgraph
itself: "Axis input must resolve to a build-time constant". Every standard-domain node of the main graph whose
inputs all come from small Constant nodes is evaluated (numpy for the common shape ops, onnx's reference
evaluator otherwise) and replaced by one Constant of the same output name. Initializers (weights) are never
read, results larger than MAX_ELEMENTS are left alone, functions are left alone (the parser inlines them with
their own scope). The Constants that fed a folded node stay; RemoveUnusedNodesPass drops them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["MAX_ELEMENTS", "FoldConstants"]

logger = logging.getLogger(__name__)

MAX_ELEMENTS = 1024  # shapes, axes and scalars; never activations or weights
STANDARD_DOMAINS = ("", "ai.onnx")


def is_standard(node: ir.Node | None, op_type: str) -> bool:
    """`node` is the standard ONNX op `op_type` (not a custom op of that name)."""
    return node is not None and node.domain in STANDARD_DOMAINS and node.op_type == op_type


_NEVER = {"Constant", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}


def _cast(node: ir.Node, args: list[np.ndarray]) -> np.ndarray:
    return args[0].astype(ir.DataType(node.attributes["to"].as_int()).numpy())


def _reshape(node: ir.Node, args: list[np.ndarray]) -> np.ndarray:
    shape = [int(d) if d != 0 else args[0].shape[i] for i, d in enumerate(args[1])]
    return args[0].reshape(shape)


def _unsqueeze(node: ir.Node, args: list[np.ndarray]) -> np.ndarray:
    return np.expand_dims(args[0], tuple(int(a) for a in args[1]))


def _concat(node: ir.Node, args: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(args, axis=node.attributes["axis"].as_int())


# The ops torch.onnx leaves around shapes, in numpy; any other op goes through onnx's reference evaluator.
NUMPY_FOLDERS: dict[str, Callable[[ir.Node, list[np.ndarray]], np.ndarray]] = {
    "Cast": _cast,
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Concat": _concat,
}


def constant_value(node: ir.Node) -> np.ndarray | None:
    """The value of a Constant node, None for anything else (or a Constant bound to a function attribute)."""
    if node.domain not in STANDARD_DOMAINS or node.op_type != "Constant" or len(node.attributes) != 1:
        return None
    ((name, attr),) = node.attributes.items()
    if attr.is_ref():
        return None
    if name == "value":
        return attr.as_tensor().numpy()
    dtypes = {
        "value_int": np.int64,
        "value_ints": np.int64,
        "value_float": np.float32,
        "value_floats": np.float32,
    }
    return np.asarray(attr.value, dtype=dtypes[name]) if name in dtypes else None


def _reference(node: ir.Node, args: list[np.ndarray], opset: int) -> list[np.ndarray] | None:
    """One node run by onnx's reference evaluator; None when it cannot (TensorRT then judges the node)."""
    from onnx.reference import ReferenceEvaluator

    proto = ir.serde.serialize_node(node)
    del proto.input[:], proto.output[:]
    proto.input.extend(f"i{k}" for k in range(len(args)))
    proto.output.extend(f"o{k}" for k in range(len(node.outputs)))
    info = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [proto],
        "fold",
        [info(n, onnx.TensorProto.UNDEFINED, None) for n in proto.input],
        [info(n, onnx.TensorProto.UNDEFINED, None) for n in proto.output],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        return [np.asarray(r) for r in ReferenceEvaluator(model).run(None, dict(zip(proto.input, args)))]
    except Exception:  # an op the evaluator cannot run stays in the graph
        return None


def _evaluate(node: ir.Node, args: list[np.ndarray], opset: int) -> np.ndarray | None:
    if len(node.outputs) != 1:
        return None
    numpy_fold = NUMPY_FOLDERS.get(node.op_type)
    if numpy_fold is not None:
        return np.asarray(numpy_fold(node, args))
    if len(args) != len(node.inputs):  # an optional input left out: positions would shift
        return None
    results = _reference(node, args, opset)
    return None if results is None else results[0]


class FoldConstants(ir.passes.InPlacePass):
    """Replace main-graph nodes computed only from small Constants by Constants. `folded`: how many, last run."""

    def __init__(self, max_elements: int = MAX_ELEMENTS) -> None:
        super().__init__()
        self.max_elements = max_elements
        self.folded = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", 20)
        known: dict[ir.Value, np.ndarray] = {}
        self.folded = 0
        for node in list(graph):
            value = constant_value(node)
            if value is not None:
                if value.size <= self.max_elements:
                    known[node.outputs[0]] = value
                continue
            inputs = [i for i in node.inputs if i is not None]
            if (
                node.domain not in STANDARD_DOMAINS
                or node.op_type in _NEVER
                or not inputs
                or any(i not in known for i in inputs)
            ):
                continue
            result = _evaluate(node, [known[i] for i in inputs], opset)
            if result is None or result.size > self.max_elements:
                continue
            known[self._replace(graph, node, result)] = result
            self.folded += 1
        logger.debug("folded %d constant nodes", self.folded)
        return ir.passes.PassResult(model, modified=self.folded > 0)

    @staticmethod
    def _replace(graph: ir.Graph, node: ir.Node, result: np.ndarray) -> ir.Value:
        old = node.outputs[0]
        const = ir.node("Constant", [], attributes={"value": ir.tensor(result)}, name=f"{node.name}_folded")
        graph.insert_before(node, const)
        ir.convenience.replace_all_uses_with(old, const.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        const.outputs[0].name = old.name
        return const.outputs[0]

    def ensures(self, model: ir.Model) -> None:
        names = [v.name for n in model.graph for v in n.outputs]
        if len(names) != len(set(names)):
            raise ir.passes.PostconditionError("folding left two values of the same name")
