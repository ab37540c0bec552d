"""Which custom nodes the ONNX parser will hand to a registered TensorRT plugin (shared by the engine passes)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import onnx_ir as ir

STANDARD_DOMAINS = ("", "ai.onnx")
Creators = Iterable[tuple[str, str, str]]  # (name, version, namespace) of each registered plugin creator
HasPlugin = Callable[[ir.Node], bool]


def is_custom(node: ir.Node) -> bool:
    return node.domain not in STANDARD_DOMAINS


def _text(node: ir.Node, name: str, default: str) -> str:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    value = attr.value
    return value.decode() if isinstance(value, bytes) else str(value)


def plugin_lookup(creators: Creators) -> HasPlugin:
    """node -> whether the parser finds a creator: (op_type, plugin_version or "1", plugin_namespace, else the
    domain, which the parser retries with)."""
    known = set(creators)

    def has_plugin(node: ir.Node) -> bool:
        version = _text(node, "plugin_version", "1")
        namespaces = (_text(node, "plugin_namespace", ""), node.domain)
        return any((node.op_type, version, ns) in known for ns in namespaces)

    return has_plugin
