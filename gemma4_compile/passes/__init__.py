"""Every edit of an ONNX graph, as an onnx-ir pass (one per module), and the way to run a list of them.

    from gemma4_compile import passes
    model = passes.run_passes(model, passes.export_cleanup())   # what the exporter does after tracing

Passes: BlockAttention (block_attention.py), FoldConstants (fold_constants.py), FuseAttention (fuse_attention.py),
RMSNormAsDiv (rms_norm_div.py), RenameShadowedOps
(rename_shadowed.py), SplitMoE (split_moe.py), MarkAot (mark_aot.py), QuantizeMatMuls and DequantizeWeights
(quantize_matmul.py), QuantizeExperts and its runner-side inverse CollapseExperts (moe_nbits.py), DequantizeRows (quantize_gather.py), ShareShapeReads and DropNoOpCasts (share_shapes.py:
the onnxruntime runner's decoder rewrite, `shared_decoder`, with FuseForOrt from ort_fusions.py), and the lowerings in `LOWERINGS` (lowerings.py;
the gqa pass in lower_gqa.py).
Importing this package imports no torch and no TensorRT, and nothing until a name is used (PEP 562), so the
runners can read `passes.lowerings` without loading onnx-ir.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {  # public name -> the module defining it
    "BlockAttention": "block_attention",
    "FoldConstants": "fold_constants",
    "FuseAttention": "fuse_attention",
    "LOWERINGS": "lowerings",
    "Lowering": "lowerings",
    "lowering_refusal": "lowerings",
    "MarkAot": "mark_aot",
    "plugin_lookup": "plugin_nodes",
    "DequantizeRows": "quantize_gather",
    "DequantizeWeights": "quantize_matmul",
    "DQWeight": "quantize_matmul",
    "NBitsWeight": "quantize_matmul",
    "QuantizeMatMuls": "quantize_matmul",
    "QuantizeExperts": "moe_nbits",
    "CollapseExperts": "moe_nbits",
    "RenameShadowedOps": "rename_shadowed",
    "RMSNormAsDiv": "rms_norm_div",
    "SplitMoE": "split_moe",
    "DropNoOpCasts": "share_shapes",
    "FuseForOrt": "ort_fusions",
    "ShareShapeReads": "share_shapes",
    "shared_decoder": "share_shapes",
    "export_cleanup": "run",
    "run_on_proto": "run",
    "run_passes": "run",
    "RemoveUnusedNodesPass": "run",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
