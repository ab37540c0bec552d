"""Rename custom ops whose op_type TensorRT's ONNX parser would give to one of its built-in importers.

The parser dispatches by op_type before it looks at the domain (docs/tensorrt.md, parser dispatch), so `gemma4::Attention`
would go to TensorRT's built-in ONNX `Attention` importer ("TensorRT only supports Attention nodes with one
output") instead of its function body. A custom-domain node with a model-local function, no registered plugin,
and an op_type the parser has a built-in importer for is renamed (node and a copy of its function) to
`<domain>_<op_type>`, which only the function can serve. Weights and math are untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

from .plugin_nodes import HasPlugin, is_custom

__all__ = ["RenameShadowedOps"]


class RenameShadowedOps(ir.passes.InPlacePass):
    """`renamed` after a run: '<domain>::<op_type>' -> the op_type the parser will see."""

    def __init__(self, has_importer: Callable[[str], bool], has_plugin: HasPlugin) -> None:
        super().__init__()
        self.has_importer, self.has_plugin = has_importer, has_plugin  # e.g. parser.supports_operator
        self.renamed: dict[str, str] = {}

    def _shadowed(self, node: ir.Node, model: ir.Model) -> bool:
        return (
            is_custom(node)
            and (node.domain, node.op_type, node.overload) in model.functions
            and self.has_importer(node.op_type)
            and not self.has_plugin(node)
        )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        clones: dict[ir.OperatorIdentifier, ir.Function] = {}
        for node in model.graph:
            if not self._shadowed(node, model):
                continue
            key = (node.domain, node.op_type, node.overload)
            if key not in clones:
                clones[key] = _renamed_copy(model.functions[key], f"{node.domain}_{node.op_type}")
            node.op_type = clones[key].name
        for clone in clones.values():
            model.functions[clone.identifier()] = clone
        self.renamed = {f"{d}::{n}": clone.name for (d, n, _), clone in clones.items()}
        return ir.passes.PassResult(model, modified=bool(clones))

    def ensures(self, model: ir.Model) -> None:
        left = [n.name for n in model.graph if self._shadowed(n, model)]
        if left:
            raise ir.passes.PostconditionError(f"custom nodes still shadowed by built-in importers: {left}")


def _renamed_copy(function: ir.Function, name: str) -> ir.Function:
    proto = ir.serde.serialize_function(function)
    proto.name = name
    return ir.serde.deserialize_function(proto)
