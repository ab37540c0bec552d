"""The `gemma4` ONNX domain: custom nodes with standard-op function bodies."""

from __future__ import annotations

import onnx
import torch

from . import attention, moe
from .common import DOMAIN, DOMAIN_VERSION, PLUGIN_NAMESPACE, PLUGIN_VERSION

OPS = {attention.OP_TYPE: attention, moe.OP_TYPE: moe}

__all__ = ["DOMAIN", "DOMAIN_VERSION", "OPS", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "functions", "translation_table"]


def translation_table() -> dict:
    """torch op -> onnxscript function emitting the custom node."""
    return {
        torch.ops.gemma4.attention.default: attention.translation(),
        torch.ops.gemma4.moe.default: moe.translation(),
    }


def functions(op_types: set[str]) -> list[onnx.FunctionProto]:
    """Reference bodies for the custom op types used in a graph."""
    return [OPS[t].function() for t in sorted(op_types)]
