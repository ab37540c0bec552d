"""Mark plugin nodes `aot=1`: the ONNX parser's switch to a quickly deployable plugin's AOT implementation.

Full TensorRT's parser takes the PTX embedded in the engine (the QDP's `aot_impl`) rather than a Python `impl`
only for nodes that carry the attribute `aot`. Every custom node with a registered plugin gets it.
"""

from __future__ import annotations

import onnx_ir as ir

from .plugin_nodes import HasPlugin, is_custom

__all__ = ["MarkAot"]


class MarkAot(ir.passes.InPlacePass):
    """`marked` after a run: how many plugin nodes carry `aot` (whether or not they had it already)."""

    def __init__(self, has_plugin: HasPlugin) -> None:
        super().__init__()
        self.has_plugin = has_plugin
        self.marked = 0

    def _plugin_nodes(self, model: ir.Model) -> list[ir.Node]:
        return [n for n in model.graph if is_custom(n) and self.has_plugin(n)]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = self._plugin_nodes(model)
        added = [n for n in nodes if "aot" not in n.attributes]
        for node in added:
            node.attributes["aot"] = ir.AttrInt64("aot", 1)
        self.marked = len(nodes)
        return ir.passes.PassResult(model, modified=bool(added))

    def ensures(self, model: ir.Model) -> None:
        unmarked = [n.name for n in self._plugin_nodes(model) if "aot" not in n.attributes]
        if unmarked:
            raise ir.passes.PostconditionError(f"plugin nodes without aot: {unmarked}")
