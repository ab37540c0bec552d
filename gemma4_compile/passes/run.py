"""Running passes: the exporter's cleanup list, and run_passes / run_on_proto with our one-line errors."""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from ..errors import Gemma4CompileError
from .fold_constants import FoldConstants
from .rms_norm_div import RMSNormAsDiv


def export_cleanup() -> list[ir.passes.PassBase]:
    """After tracing: fold constant shape arithmetic, write RMSNorms in the form onnxruntime fuses, then drop
    the Constants nothing reads any more."""
    return [FoldConstants(), RMSNormAsDiv(), RemoveUnusedNodesPass()]


def run_passes(model: ir.Model, passes: Sequence[ir.passes.PassBase]) -> ir.Model:
    """Run `passes` in order (onnx-ir's PassManager); our own one-line errors come out unwrapped."""
    try:
        return ir.passes.PassManager(passes)(model).model
    except ir.passes.PassError as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, Gemma4CompileError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def run_on_proto(proto: onnx.ModelProto, passes: Sequence[ir.passes.PassBase]) -> None:
    """Run `passes` on a ModelProto in place. The empty strings onnx.parser and the exporter write explicitly
    (function nodes' domain, the model doc_string) are written back, so untouched parts keep their bytes."""
    out = ir.serde.serialize_model(run_passes(ir.serde.deserialize_model(proto), passes))
    for function in out.functions:
        for node in function.node:
            if not node.HasField("domain"):
                node.domain = ""
    if proto.HasField("doc_string"):
        out.doc_string = proto.doc_string
    proto.CopyFrom(out)
