"""The `gemma4` ONNX domain as onnx and onnxscript see it; names and versions are the contracts'."""

from __future__ import annotations

import onnx
import onnxscript
from onnx.defs import OpSchema

from .contract import DOMAIN, DOMAIN_VERSION, KERNEL_DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION

__all__ = [
    "DOMAIN",
    "DOMAIN_VERSION",
    "KERNEL_DOMAIN",
    "PLUGIN_NAMESPACE",
    "PLUGIN_VERSION",
    "plugin_attributes",
    "register_schema",
]


def plugin_attributes() -> dict[str, str]:
    return {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}


def register_schema(schema: OpSchema) -> onnxscript.values.Opset:
    """Register once per process: onnxscript needs a schema to emit a node of an unknown domain."""
    try:
        onnx.defs.get_schema(schema.name, DOMAIN_VERSION, schema.domain)
    except onnx.defs.SchemaError:
        onnx.defs.register_schema(schema)
    return onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)
