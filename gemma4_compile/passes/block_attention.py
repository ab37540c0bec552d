"""Give attention nodes that carry `block_ids` full TensorRT's 8-input plugin identity.

A quickly deployable plugin's signature fixes its input count, so full TensorRT has one plugin for the 7-input
`gemma4::SlidingWindowAttention` and another, `gemma4::SlidingWindowAttentionBlocks`, for the 8-input form of
26B/31B exports with images (plugins/qdp.py). The engine builder runs this pass when the second one is
registered; the node keeps its inputs, attributes and name, only its op type changes. TensorRT-RTX's Python
plugin takes both forms under one name and never needs it.
"""

from __future__ import annotations

import onnx_ir as ir

from ..ops.attention import SLIDING_WINDOW_ATTENTION, SLIDING_WINDOW_ATTENTION_BLOCKS

__all__ = ["BlockAttention"]


class BlockAttention(ir.passes.InPlacePass):
    """`renamed` after a run: the attention nodes that now name the 8-input plugin."""

    def __init__(self) -> None:
        super().__init__()
        self.renamed = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        source, blocks = SLIDING_WINDOW_ATTENTION, SLIDING_WINDOW_ATTENTION_BLOCKS
        self.renamed = 0
        for node in model.graph:
            has_blocks = len(node.inputs) == len(blocks.inputs) and node.inputs[-1] is not None
            if node.domain == source.domain and node.op_type == source.op_type and has_blocks:
                node.op_type = blocks.op_type
                self.renamed += 1
        return ir.passes.PassResult(model, modified=self.renamed > 0)
