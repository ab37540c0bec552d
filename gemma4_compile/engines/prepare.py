"""An export graph (decoder.onnx, embed.onnx, vision.onnx, audio.onnx) -> a parsed TensorRT network and its
capability report (which path each custom node took).

Every graph goes through the same preparation. The parser reads the graph from memory and its external weights
from disk next to the graph file
(`parser.parse(bytes, path)`), so only the small graph proto is loaded, edited and held in Python. The edits
are the graph passes of gemma4_compile.passes, none touching weights or math:
* FoldConstants: the parser insists on constant axes it cannot always fold itself;
* FuseAttention, where the parser imports ONNX `Attention` (TensorRT 10.14+, TensorRT-RTX): the vision tower's
  standard-op attention becomes one `IAttention` (a fused kernel; 7-13x the generic layers on an H200);
* SplitMoE + MarkAot, where the seven MoE stage plugins are registered (full TensorRT's AOT plugins): an AOT
  plugin launches one kernel, and `aot=1` is the parser's switch to the AOT implementation;
* RenameShadowedOps: a custom op named like one of the parser's built-in importers reaches its function body;
* BlockAttention, first, where full TensorRT's 8-input attention QDP is registered: attention nodes carrying
  block_ids (26B/31B exports with images) take its op type, since a QDP's input count is fixed.
Before them, the MoE function body is swapped for its static-shape twin (`ops.moe.body.BODY_STATIC`, same math):
the exported body selects each expert's tokens with NonZero, which TensorRT-RTX cannot import.

capability.json's path is read from the parsed network, not guessed: the layer that produces a custom node's
first output is a plugin layer when the plugin was used, and an ordinary layer of the inlined body otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from .. import ops, passes
from ..errors import BuildError
from ..export.manifest import DECODER, ExportManifest
from ..passes.plugin_nodes import HasPlugin, is_custom
from ..plugins import moe_stages
from .seam import PluginStatus, TrtFlavour, make_logger, plugin_creators

PLUGIN, INLINED, REJECTED, NOT_REACHED, ABSENT = "plugin", "inlined", "rejected", "not_reached", "absent"
_PLUGIN_LAYERS = ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3")


@dataclass(frozen=True)
class OnnxNode:
    name: str
    op_type: str  # as exported
    domain: str
    outputs: tuple[str, ...]
    has_function: bool
    parsed_as: str  # op_type the parser saw (differs when renamed)


@dataclass(frozen=True)
class ParserIssue:
    node: str
    op_type: str
    code: str
    message: str
    function_stack: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "node": self.node,
            "op_type": self.op_type,
            "code": self.code,
            "message": self.message,
            "function_stack": list(self.function_stack),
        }

    def one_line(self) -> str:
        where = f"{self.node!r} ({self.op_type})" if self.node else f"({self.op_type or 'graph'})"
        return f"{where}: {self.code}: {' '.join(self.message.split())}"


@dataclass(frozen=True)
class GraphEdits:
    """What the passes changed in the graph proto before parsing (never the weights or the math)."""

    renamed: dict[str, str]  # '<domain>::<op_type>' -> the name the parser saw (RenameShadowedOps)
    folded_constants: int  # all-constant nodes replaced by Constants (FoldConstants)
    split_moe: int = 0  # gemma4::MoE nodes replaced by their seven stage plugins (SplitMoE)
    aot: int = 0  # custom nodes given aot=1, so the parser takes their plugin's AOT implementation (MarkAot)
    static_moe_body: bool = False  # the MoE function body was swapped for its static-shape twin
    fp32_nodes: int = 0  # top-level nodes with an fp32 output as exported (a half graph's fp32 islands)
    block_attention: int = 0  # attention nodes given the 8-input plugin's op type (BlockAttention)
    fused_attention: int = 0  # standard-op attention chains folded into one ONNX Attention (FuseAttention)

    def to_dict(self) -> dict:
        return {
            "renamed": dict(self.renamed),
            "folded_constants": self.folded_constants,
            "split_moe": self.split_moe,
            "aot": self.aot,
            "static_moe_body": self.static_moe_body,
            "fp32_nodes": self.fp32_nodes,
            "block_attention": self.block_attention,
            "fused_attention": self.fused_attention,
        }


@dataclass(frozen=True)
class ParsedNetwork:
    """A parsed network and the TensorRT objects that must outlive the build (kept together)."""

    flavour: TrtFlavour
    logger: Any
    builder: Any
    network: Any
    parser: Any
    nodes: tuple[OnnxNode, ...]  # the custom-domain nodes of the graph
    issues: tuple[ParserIssue, ...]
    edits: GraphEdits

    @property
    def ok(self) -> bool:
        return not self.issues


def _custom_nodes(model: ir.Model, renamed: dict[str, str]) -> tuple[OnnxNode, ...]:
    exported = {new: old.split("::", 1)[1] for old, new in renamed.items()}
    out = []
    for node in model.graph:
        if is_custom(node):
            op_type = exported.get(node.op_type, node.op_type)
            has_function = (node.domain, op_type, node.overload) in model.functions
            outputs = tuple(v.name for v in node.outputs)
            out.append(OnnxNode(node.name, op_type, node.domain, outputs, has_function, node.op_type))
    return tuple(out)


def prepare_graph(
    path: Path, flavour: TrtFlavour, parser: Any, tokens_hint: int = 1
) -> tuple[bytes, tuple[OnnxNode, ...], GraphEdits]:
    """Load an export graph without its weights and run the engine passes on it (module docstring);
    `tokens_hint` = tokens per step to tune the MoE GEMM tile for.

    -> (model bytes for `parser.parse`, the custom-domain nodes, what was edited).
    """
    try:
        model = ir.serde.deserialize_model(onnx.load(str(path), load_external_data=False))
    except Exception as e:  # protobuf raises several types for a corrupt file
        raise BuildError(f"cannot read {path}: {e}") from None
    static_moe = _static_moe_body(model)
    fp32 = sum(any(v.dtype == ir.DataType.FLOAT for v in node.outputs) for node in model.graph)
    creators = set(plugin_creators(flavour))
    has_plugin = passes.plugin_lookup(creators)
    blocks = _block_attention(model, creators, flavour)
    _refuse_unplugged_inputs(model, has_plugin, optional_inputs=flavour.is_rtx)
    fold, split, aot = passes.FoldConstants(), passes.SplitMoE(tokens_hint), passes.MarkAot(has_plugin)
    fuse = passes.FuseAttention()
    rename = passes.RenameShadowedOps(parser.supports_operator, has_plugin)
    staged = [split, aot] if moe_stages.stages_registered(creators) else []  # full TensorRT's AOT plugins
    fused = [fuse] if parser.supports_operator("Attention") else []
    model = passes.run_passes(model, [fold, *fused, *staged, rename])
    edits = GraphEdits(
        rename.renamed, fold.folded, split.split, aot.marked, static_moe, fp32, blocks, fuse.fused
    )
    return ir.serde.serialize_model(model).SerializeToString(), _custom_nodes(model, rename.renamed), edits


def _block_attention(model: ir.Model, creators: set[tuple[str, str, str]], flavour: TrtFlavour) -> int:
    """Full TensorRT with the 8-input attention QDP registered: attention nodes with block_ids take its op type
    (passes/block_attention.py); how many did."""
    blocks = ops.contract("SlidingWindowAttentionBlocks")
    if flavour.is_rtx or (blocks.op_type, blocks.plugin_version, blocks.plugin_namespace) not in creators:
        return 0
    rename = passes.BlockAttention()
    passes.run_passes(model, [rename])
    return rename.renamed


def _refuse_unplugged_inputs(model: ir.Model, has_plugin: HasPlugin, optional_inputs: bool) -> None:
    """The TensorRT-RTX plugins take a node's optional inputs (`optional_inputs`: attention's block_ids, 26B/31B
    exports with images); full TensorRT's AOT plugins have a fixed signature (the 8-input attention has its own
    plugin, `_block_attention`), so a node with more inputs than its plugin takes would lose them silently
    there: refuse that build in one line."""
    if optional_inputs:
        return
    for node in model.graph:
        if is_custom(node) and has_plugin(node):
            contract = ops.contract(node.op_type)
            required = len(contract.plugin_inputs())
            if len(node.inputs) > required:
                raise BuildError(
                    f"{node.name}: the full-TensorRT {node.op_type} plugin does not take "
                    f"'{contract.input_names[required]}' yet (26B/31B exports with images); build with "
                    "TensorRT-RTX, without --plugins, or export with --modalities text"
                )


def _static_moe_body(model: ir.Model) -> bool:
    """Swap the MoE function body for the one without data-dependent shapes (module docstring); a plugin
    that takes the node ignores the body either way."""
    from ..ops.moe import body

    key = ("gemma4", body.OP_TYPE, "")
    if key not in model.functions:
        return False
    model.functions[key] = ir.serde.deserialize_function(body.function(body.BODY_STATIC))
    return True


def _issues(parser: Any, nodes: tuple[OnnxNode, ...]) -> tuple[ParserIssue, ...]:
    exported = {n.name: n.op_type for n in nodes}
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        name = e.node_name() or ""
        stack = tuple(e.local_function_stack())
        code = getattr(e.code(), "name", str(e.code()))
        out.append(ParserIssue(name, exported.get(name, e.node_operator()), code, e.desc(), stack))
    return tuple(out)


def network_from_onnx(
    export: ExportManifest, flavour: TrtFlavour, tokens_hint: int = 1, role: str = DECODER
) -> ParsedNetwork:
    """Parse the export's `role` graph into a strongly typed network; parser errors are returned, not raised."""
    trt = flavour.module
    logger = make_logger(flavour)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # precision comes from the graph
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    data, nodes, edits = prepare_graph(export.graph_path(role), flavour, parser, tokens_hint)
    parser.parse(data, str(export.graph_path(role)))  # the path locates the external weights
    return ParsedNetwork(flavour, logger, builder, network, parser, nodes, _issues(parser, nodes), edits)


def fp32_layers(parsed: ParsedNetwork) -> int:
    """Layers with an fp32 output in the parsed network: in a half-precision export these are the graph's
    fp32 islands (attention softmax, RoPE, norms the exporter kept in fp32). The network is strongly typed, so
    the engine computes them in fp32 as well; recorded so that a pass or parser that dropped them shows."""
    net, fp32 = parsed.network, parsed.flavour.module.DataType.FLOAT
    return sum(
        any(net.get_layer(i).get_output(j).dtype == fp32 for j in range(net.get_layer(i).num_outputs))
        for i in range(net.num_layers)
    )


# ----- capability.json ------------------------------------------------------------------------------------


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
    graph_edits: dict = field(default_factory=dict)  # GraphEdits.to_dict()

    @property
    def ok(self) -> bool:
        return not self.rejected

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes:
            out[n.path] = out.get(n.path, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "tensorrt": self.tensorrt,
            "ok": self.ok,
            "counts": self.counts(),
            "plugins": self.plugins.to_dict(),
            "graph_edits": self.graph_edits,
            "nodes": [n.to_dict() for n in self.nodes],
            "rejected": [i.to_dict() for i in self.rejected],
        }


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
        note = (
            f"op_type {node.op_type!r} has a built-in TensorRT importer; parsed as {node.parsed_as!r} "
            "so that the function body is inlined"
        )
    return (PLUGIN if kind in _PLUGIN_LAYERS else INLINED), layer, kind, note


def capability_report(
    target: str, export: ExportManifest, parsed: ParsedNetwork, plugins: PluginStatus, role: str = DECODER
):
    """Classify every export.json custom node (plus any custom-domain node export.json forgot). export.json
    lists the decoder's custom nodes only; other graphs report the custom-domain nodes they have."""
    by_name = {n.name: n for n in parsed.nodes}
    producers = _producers(parsed.network)
    listed_nodes = export.custom_nodes if role == DECODER else []
    entries = [(c["name"], c["op_type"], c.get("layer"), c.get("kind")) for c in listed_nodes]
    listed = {c["name"] for c in listed_nodes}
    entries += [(n.name, n.op_type, None, None) for n in parsed.nodes if n.name not in listed]
    nodes = []
    for name, op_type, layer, kind in entries:
        path, trt_layer, trt_type, note = _path(by_name.get(name), parsed.issues, producers, name)
        if name not in listed and role == DECODER:
            note = "; ".join(filter(None, [note, "custom node missing from export.json custom_nodes"]))
        nodes.append(NodePath(name, op_type, layer, kind, path, trt_layer, trt_type, note))
    return CapabilityReport(
        target, parsed.flavour.title, plugins, tuple(nodes), parsed.issues, parsed.edits.to_dict()
    )
