"""Graph clean-ups applied after tracing.

`FoldConstantShapes`: the exporter (run with optimize=False, since the weights live on the meta device) leaves
`Reshape(Constant, Constant)` feeding ReduceMean's axes and `Cast(Constant)` scalars. TensorRT's parser
needs reduction axes that are build-time constants ("Axis input must resolve to a build-time constant"), so
every small op whose inputs are all constants is evaluated here and replaced by one Constant.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

__all__ = ["FoldConstantShapes", "clean_up"]

logger = logging.getLogger(__name__)


def _cast(node: ir.Node, args: list[np.ndarray]) -> np.ndarray:
    return args[0].astype(ir.DataType(node.attributes["to"].as_int()).numpy())


def _reshape(node: ir.Node, args: list[np.ndarray]) -> np.ndarray:
    shape = [int(d) if d != 0 else args[0].shape[i] for i, d in enumerate(args[1])]
    return args[0].reshape(shape)


def _unsqueeze(node: ir.Node, args: list[np.ndarray]) -> np.ndarray:
    return np.expand_dims(args[0], tuple(int(a) for a in args[1]))


def _concat(node: ir.Node, args: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(args, axis=node.attributes["axis"].as_int())


FOLDERS: dict[str, Callable[[ir.Node, list[np.ndarray]], np.ndarray]] = {
    "Cast": _cast,
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Concat": _concat,
}
MAX_FOLDED_ELEMENTS = 1024  # shapes and scalars only; never weights


def _constant_value(node: ir.Node) -> np.ndarray | None:
    attrs = node.attributes
    if "value" in attrs:
        return attrs["value"].as_tensor().numpy()
    for name, dtype in (("value_int", np.int64), ("value_ints", np.int64), ("value_float", np.float32),
                        ("value_floats", np.float32)):  # fmt: skip
        if name in attrs:
            return np.asarray(attrs[name].value, dtype=dtype)
    return None


class FoldConstantShapes(ir.passes.InPlacePass):
    """Replace small all-constant Cast/Reshape/Unsqueeze/Concat nodes by Constants."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        known: dict[ir.Value, np.ndarray] = {}
        folded = 0
        for node in list(graph):
            if node.domain == "" and node.op_type == "Constant":
                value = _constant_value(node)
                if value is not None:
                    known[node.outputs[0]] = value
                continue
            fold = FOLDERS.get(node.op_type) if node.domain == "" else None
            inputs = [i for i in node.inputs if i is not None]
            if fold is None or not inputs or any(i not in known for i in inputs):
                continue
            result = np.asarray(fold(node, [known[i] for i in inputs]))
            if result.size > MAX_FOLDED_ELEMENTS:
                continue
            old = node.outputs[0]
            const = ir.node("Constant", [], attributes={"value": ir.tensor(result)}, name=f"{node.name}_folded")
            graph.insert_before(node, const)
            ir.convenience.replace_all_uses_with(old, const.outputs[0])
            graph.remove(node, safe=True)
            const.outputs[0].name = old.name
            known[const.outputs[0]] = result
            folded += 1
        logger.debug("folded %d constant nodes", folded)
        return ir.passes.PassResult(model, modified=folded > 0)


def clean_up(model: ir.Model) -> ir.Model:
    """Fold constant shape arithmetic, then drop the Constant nodes nothing reads any more."""
    passes = ir.passes.Sequential(FoldConstantShapes(), RemoveUnusedNodesPass())
    return passes(model).model
