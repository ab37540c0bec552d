"""Shared pieces of the `gemma4` ONNX domain."""

from __future__ import annotations

import onnx
import onnxscript
from onnx.defs import OpSchema

DOMAIN = "gemma4"
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "gemma4"
PLUGIN_VERSION = "1"

# TensorRT's parser picks a registered plugin over the local function when these are present.
PLUGIN_ATTRS = (
    OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace"),
    OpSchema.Attribute("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version"),
)


def plugin_attributes() -> dict[str, str]:
    return {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}


def register_schema(schema: OpSchema) -> onnxscript.values.Opset:
    """Register once per process: onnxscript needs a schema to emit a node of an unknown domain."""
    try:
        onnx.defs.get_schema(schema.name, DOMAIN_VERSION, schema.domain)
    except onnx.defs.SchemaError:
        onnx.defs.register_schema(schema)
    return onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)
