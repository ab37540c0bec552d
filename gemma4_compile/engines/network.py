"""Stage 1: decoder.onnx -> TensorRT network (`NetworkFromOnnx`, eager twin `network_from_onnx`).

The parser reads the graph from memory and its external weights from disk next to decoder.onnx
(`parser.parse(bytes, path)`), so only the small graph proto is edited and held in Python.

Three edits, none touching weights or math. Small all-constant subgraphs are folded (engines/fold.py), since
the parser insists on constant axes it cannot always fold itself. Where the seven MoE stage plugins are
registered (full TensorRT's AOT plugins, plugins/moe_stages.py), each `gemma4::MoE` node becomes those seven
nodes, since an AOT plugin launches one kernel, and every node with a plugin gets `aot=1`, the parser's switch
to the AOT implementation. And, for the inline path: The parser dispatches by op_type before it looks at the domain
(docs/tensorrt.md, parser dispatch), so `gemma4::Attention` would go to TensorRT's built-in ONNX `Attention` importer
("TensorRT only supports Attention nodes with one output") instead of its function body. A custom-domain node
that has a model-local function, no registered plugin, and an op_type the parser has a built-in importer for
is renamed (node and a copy of its function) to `<domain>_<op_type>`, which only the function can serve.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from ..errors import BuildError
from ..plugins import moe_stages
from .export_info import ExportInfo
from .fold import fold_constant_subgraphs
from .plugin_status import plugin_creators
from .trt import TrtFlavour
from .trt_logger import make_logger

STANDARD_DOMAINS = ("", "ai.onnx")


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
        return {"node": self.node, "op_type": self.op_type, "code": self.code, "message": self.message,
                "function_stack": list(self.function_stack)}  # fmt: skip

    def one_line(self) -> str:
        where = f"{self.node!r} ({self.op_type})" if self.node else f"({self.op_type or 'graph'})"
        return f"{where}: {self.code}: {' '.join(self.message.split())}"


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


def _has_creator(creators: set[tuple[str, str, str]], node: onnx.NodeProto) -> bool:
    """Would the parser find a plugin for this node? (name, plugin_version or "1", namespace or the domain)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    text = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in attrs.items()}
    version = text.get("plugin_version", "1")
    namespaces = (text.get("plugin_namespace", ""), node.domain)  # the parser retries with the domain
    return any((node.op_type, version, ns) in creators for ns in namespaces)


@dataclass(frozen=True)
class GraphEdits:
    """What was changed in the graph proto before parsing (never the weights or the math)."""

    renamed: dict[str, str]  # exported op_type -> the name the parser saw (see the module docstring)
    folded_constants: int  # all-constant nodes replaced by Constants (engines/fold.py)
    split_moe: int = 0  # gemma4::MoE nodes replaced by their seven stage plugins (plugins/moe_stages.py)
    aot: int = 0  # custom nodes given aot=1, so the parser takes their plugin's AOT implementation

    def to_dict(self) -> dict:
        return {"renamed": dict(self.renamed), "folded_constants": self.folded_constants,
                "split_moe": self.split_moe, "aot": self.aot}  # fmt: skip


def _rename_shadowed(
    model: onnx.ModelProto, creators: set[tuple[str, str, str]], parser: Any
) -> tuple[tuple[OnnxNode, ...], dict]:
    functions = {(f.domain, f.name): f for f in model.functions}
    renames: dict[tuple[str, str], str] = {}
    nodes = []
    for node in model.graph.node:
        if node.domain in STANDARD_DOMAINS:
            continue
        key = (node.domain, node.op_type)
        exported = node.op_type
        if key in functions and parser.supports_operator(node.op_type) and not _has_creator(creators, node):
            renames.setdefault(key, f"{node.domain}_{node.op_type}")
            node.op_type = renames[key]
        nodes.append(
            OnnxNode(node.name, exported, node.domain, tuple(node.output), key in functions, node.op_type)
        )
    for (domain, name), new_name in renames.items():
        clone = onnx.FunctionProto()
        clone.CopyFrom(functions[(domain, name)])
        clone.name = new_name
        model.functions.append(clone)
    return tuple(nodes), {f"{d}::{n}": new for (d, n), new in renames.items()}


def mark_aot(model: onnx.ModelProto, creators: set[tuple[str, str, str]]) -> int:
    """Give every custom node that has a registered plugin the bool attribute `aot`, which is how the ONNX
    parser is told to use a quickly deployable plugin's AOT implementation (the PTX embedded in the engine)
    rather than a Python `impl`; returns how many nodes were marked."""
    marked = 0
    for node in model.graph.node:
        if node.domain in STANDARD_DOMAINS or not _has_creator(creators, node):
            continue
        if not any(a.name == "aot" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("aot", 1))
        marked += 1
    return marked


def prepare_decoder(
    path: Path, flavour: TrtFlavour, parser: Any, tokens_hint: int = 1
) -> tuple[bytes, tuple[OnnxNode, ...], GraphEdits]:
    """Load decoder.onnx without its weights, fold constant subgraphs, split MoE nodes into stage plugins when
    those are registered (full TensorRT's AOT plugins; `tokens_hint` = tokens per step to tune the GEMM tile
    for), rename shadowed custom ops.

    -> (model bytes for `parser.parse`, the custom-domain nodes, what was edited).
    """
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises several types for a corrupt file
        raise BuildError(f"cannot read {path}: {e}") from None
    folded = fold_constant_subgraphs(model)
    creators = set(plugin_creators(flavour))
    split = aot = 0
    if moe_stages.stages_registered(creators):  # full TensorRT's AOT plugins (plugins/qdp.py)
        split = moe_stages.split_moe(model, tokens_hint=tokens_hint)
        aot = mark_aot(model, creators)
    nodes, renamed = _rename_shadowed(model, creators, parser)
    return model.SerializeToString(), nodes, GraphEdits(renamed, folded, split, aot)


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


def network_from_onnx(export: ExportInfo, flavour: TrtFlavour, tokens_hint: int = 1) -> ParsedNetwork:
    """Parse the export's decoder into a strongly typed network; parser errors are returned, not raised."""
    trt = flavour.module
    logger = make_logger(flavour)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # precision comes from the graph
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    data, nodes, edits = prepare_decoder(export.decoder.file, flavour, parser, tokens_hint)
    parser.parse(data, str(export.decoder.file))  # the path locates the external weights
    return ParsedNetwork(flavour, logger, builder, network, parser, nodes, _issues(parser, nodes), edits)


class NetworkFromOnnx:
    """Lazy `network_from_onnx`: construct now, parse when called."""

    def __init__(self, export: ExportInfo, flavour: TrtFlavour):
        self.export, self.flavour = export, flavour

    def __call__(self) -> ParsedNetwork:
        return network_from_onnx(self.export, self.flavour)
