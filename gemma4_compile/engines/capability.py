"""capability.json: which path each `gemma4` custom node took in TensorRT, and what TensorRT rejected.

The path is read from the parsed network, not guessed: the layer that produces a custom node's first output
is a plugin layer when the plugin was used, and an ordinary layer of the inlined function body otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .export_info import ExportInfo
from .network import OnnxNode, ParsedNetwork, ParserIssue
from .plugin_status import PluginStatus

PLUGIN, INLINED, REJECTED, NOT_REACHED, ABSENT = "plugin", "inlined", "rejected", "not_reached", "absent"
_PLUGIN_LAYERS = ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3")


@dataclass(frozen=True)
class NodePath:
    name: str
    op_type: str
    layer: int | None
    kind: str | None
    # plugin | inlined | rejected | not_reached (the parser stopped earlier) | absent (not in the graph)
    path: str
    trt_layer: str | None = None  # the layer producing the node's first output
    trt_layer_type: str | None = None
    note: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None or k in ("layer", "kind")}


@dataclass(frozen=True)
class CapabilityReport:
    target: str
    tensorrt: str  # flavour title, e.g. "TensorRT-RTX 1.7.1.116"
    plugins: PluginStatus
    nodes: tuple[NodePath, ...]
    rejected: tuple[ParserIssue, ...]
    graph_edits: dict = field(default_factory=dict)  # network.GraphEdits.to_dict()

    @property
    def ok(self) -> bool:
        return not self.rejected

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes:
            out[n.path] = out.get(n.path, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {"target": self.target, "tensorrt": self.tensorrt, "ok": self.ok, "counts": self.counts(),
                "plugins": self.plugins.to_dict(), "graph_edits": self.graph_edits,
                "nodes": [n.to_dict() for n in self.nodes], "rejected": [i.to_dict() for i in self.rejected]}  # fmt: skip


def _producers(network) -> dict[str, tuple[str, str]]:
    """tensor name -> (layer name, layer type name) for every layer output."""
    out = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = getattr(layer.type, "name", str(layer.type))
        for j in range(layer.num_outputs):
            out[layer.get_output(j).name] = (layer.name, kind)
    return out


def _path(node: OnnxNode | None, issues: tuple[ParserIssue, ...], producers: dict, name: str):
    """-> (path, trt layer, trt layer type, note) for one export.json custom node."""
    if node is None:
        return ABSENT, None, None, "export.json lists this node but decoder.onnx has no node of that name"
    hit = next((i for i in issues if i.node == name or name in i.function_stack), None)
    if hit is not None:
        return REJECTED, None, None, hit.one_line()
    produced = producers.get(node.outputs[0]) if node.outputs else None
    if produced is None:
        return NOT_REACHED, None, None, "the parser stopped before this node" if issues else "no layer found"
    layer, kind = produced
    note = None
    if node.parsed_as != node.op_type:
        note = (f"op_type {node.op_type!r} has a built-in TensorRT importer; parsed as {node.parsed_as!r} "
                "so that the function body is inlined")  # fmt: skip
    return (PLUGIN if kind in _PLUGIN_LAYERS else INLINED), layer, kind, note


def capability_report(target: str, export: ExportInfo, parsed: ParsedNetwork, plugins: PluginStatus):
    """Classify every export.json custom node (plus any custom-domain node export.json forgot)."""
    by_name = {n.name: n for n in parsed.nodes}
    producers = _producers(parsed.network)
    entries = [(c.name, c.op_type, c.layer, c.kind) for c in export.custom_nodes]
    listed = {c.name for c in export.custom_nodes}
    entries += [(n.name, n.op_type, None, None) for n in parsed.nodes if n.name not in listed]
    nodes = []
    for name, op_type, layer, kind in entries:
        path, trt_layer, trt_type, note = _path(by_name.get(name), parsed.issues, producers, name)
        if name not in listed:
            note = "; ".join(filter(None, [note, "custom node missing from export.json custom_nodes"]))
        nodes.append(NodePath(name, op_type, layer, kind, path, trt_layer, trt_type, note))
    return CapabilityReport(
        target, parsed.flavour.title, plugins, tuple(nodes), parsed.issues, parsed.edits.to_dict()
    )
