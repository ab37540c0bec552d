"""The `gemma4` ONNX domain as the exporter uses it: custom nodes with standard-op function bodies.

Each op is a unit under `gemma4_compile.ops` (contract, ONNX body and translation, torch reference); this
package is the exporter's view of the registry: the translation table and the bodies of the ops a graph uses.
"""

from __future__ import annotations

import onnx

from ... import ops
from ...ops.attention import body as attention
from ...ops.moe import body as moe
from ...ops.onnx_domain import DOMAIN, DOMAIN_VERSION, PLUGIN_NAMESPACE, PLUGIN_VERSION

__all__ = [
    "DOMAIN",
    "DOMAIN_VERSION",
    "PLUGIN_NAMESPACE",
    "PLUGIN_VERSION",
    "attention",
    "functions",
    "moe",
    "translation_table",
]


def translation_table() -> dict:
    """torch op -> onnxscript function emitting the custom node, for every exported op."""
    import torch

    import gemma4_compile.model.ops  # noqa: F401  (defines torch.ops.gemma4.*)

    return {
        getattr(torch.ops.gemma4, e.torch_op).default: ops.part(e.op_type, "body").translation()
        for e in ops.exported()
    }


def functions(op_types: set[str], block_ids: bool = False) -> list[onnx.FunctionProto]:
    """Reference bodies for the custom op types used in a graph (UnknownOpError for any other); `block_ids`:
    the attention nodes take the 8th input (one body serves every node of an op type in a model)."""
    return [
        attention.function(block_ids) if t == attention.OP_TYPE else ops.part(t, "body").function()
        for t in sorted(op_types)
    ]
