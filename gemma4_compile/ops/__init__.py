"""The `gemma4` custom ops as units: one frozen contract per op (`contract.OpContract`) and one registry.

ops.entry("MoE").contract.schema()     the ONNX OpSchema
ops.entry("MoE").contract.fields       the TensorRT plugin fields
ops.with_plugin("rtx")                 the ops a TensorRT-RTX plugin serves
ops.docs.render_table()                the op table of docs/export-format.md
"""

from .contract import (
    DOMAIN,
    DOMAIN_VERSION,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    Attr,
    FieldSpec,
    OpContract,
    Param,
    PluginError,
    UnknownOpError,
    field_arrays,
    parse_fields,
)
from .registry import OPS, OpEntry, contract, entry, exported, part, resolve, with_plugin

__all__ = [
    "DOMAIN",
    "DOMAIN_VERSION",
    "OPS",
    "PLUGIN_NAMESPACE",
    "PLUGIN_VERSION",
    "Attr",
    "FieldSpec",
    "OpContract",
    "OpEntry",
    "Param",
    "PluginError",
    "UnknownOpError",
    "contract",
    "entry",
    "exported",
    "field_arrays",
    "parse_fields",
    "part",
    "resolve",
    "with_plugin",
]
