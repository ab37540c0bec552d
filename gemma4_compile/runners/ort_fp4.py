"""nvfp4 exports on onnxruntime: it has no FLOAT4E2M1 DequantizeLinear, so for validation on a CPU the runner
dequantizes those weights once, before the session starts, into a private copy of the decoder.

The FP4 and E4M3 codes are decoded by onnx-ir/ml_dtypes, not by the project's packer, so a wrong nibble order or
scale layout in the export still shows up as wrong logits; what this does not check is TensorRT's FP4 kernel.
Memory: every nvfp4 weight becomes float for the session's lifetime (fine for tiny and mid-size models).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

FP4 = ir.DataType.FLOAT4E2M1


def has_fp4(model: ir.Model) -> bool:
    return any(v.dtype == FP4 for v in model.graph.initializers.values())


def _weight_of(node: ir.Node) -> np.ndarray | None:
    """The float tensor a `DequantizeLinear(FP4 codes, DequantizeLinear(E4M3 scales, global))` computes."""
    if node.op_type != "DequantizeLinear":
        return None
    codes, scales = node.inputs[0], node.inputs[1]
    if codes.const_value is None or codes.dtype != FP4:
        return None
    inner = scales.producer()
    if inner is None or inner.op_type != "DequantizeLinear":
        return None
    block_scales, glob = (v.const_value.numpy() for v in inner.inputs[:2])
    out_dtype = glob.dtype  # DequantizeLinear's output has the scale's type
    per_block = (block_scales.astype(np.float32) * glob.astype(np.float32)).astype(out_dtype)
    block = node.attributes["block_size"].as_int()
    values = codes.const_value.numpy().astype(np.float32)
    return (values * np.repeat(per_block.astype(np.float32), block, axis=1)).astype(out_dtype)


def dequantize_fp4(model: ir.Model) -> int:
    """Replace, in place, each nvfp4 weight's two DequantizeLinear by a float initializer; returns how many."""
    graph, done = model.graph, 0
    for node in list(graph):
        weight = _weight_of(node)
        if weight is None:
            continue
        out, inner = node.outputs[0], node.inputs[1].producer()
        name = out.name
        value = ir.Value(name=f"{name}_dequantized", type=out.type, shape=out.shape)
        value.const_value = ir.tensor(weight, name=value.name)
        graph.register_initializer(value)
        ir.convenience.replace_all_uses_with(out, value)
        graph.remove(node, safe=True)
        if not inner.outputs[0].uses():
            graph.remove(inner, safe=True)
        done += 1
    for name in [n for n, v in graph.initializers.items() if not v.uses()]:
        graph.initializers.pop(name)
    return done


def dequantized_copy(path: Path, workdir: str | Path | None = None) -> tempfile.TemporaryDirectory | None:
    """A temporary directory holding `path`'s graph with its nvfp4 weights dequantized (decoder.onnx + its
    data), or None when the graph has none. The caller keeps the returned object alive while loading."""
    model = ir.load(path)
    if not has_fp4(model):
        return None
    dequantize_fp4(model)
    tmp = tempfile.TemporaryDirectory(prefix="gemma4-fp4-", dir=workdir)
    ir.save(model, Path(tmp.name) / path.name, external_data=f"{path.stem}.data")
    return tmp
