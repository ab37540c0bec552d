"""The `gemma4` ONNX domain: custom nodes with standard-op function bodies.

Which ops exist, their schemas and attributes are the contracts of `gemma4_compile.ops`; this package holds
the exporter's side of each: the onnxscript translation and the function body (`<op module>.function()`).
"""

from __future__ import annotations

import onnx

from ... import ops
from .common import DOMAIN, DOMAIN_VERSION, PLUGIN_NAMESPACE, PLUGIN_VERSION

__all__ = ["DOMAIN", "DOMAIN_VERSION", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "functions", "translation_table"]


def translation_table() -> dict:
    """torch op -> onnxscript function emitting the custom node, for every exported op."""
    import torch

    import gemma4_compile.model.ops  # noqa: F401  (defines torch.ops.gemma4.*)

    return {
        getattr(torch.ops.gemma4, e.torch_op).default: ops.resolve(e.body).translation()
        for e in ops.exported()
    }


def functions(op_types: set[str]) -> list[onnx.FunctionProto]:
    """Reference bodies for the custom op types used in a graph (UnknownOpError for any other)."""
    return [ops.part(t, "body").function() for t in sorted(op_types)]
