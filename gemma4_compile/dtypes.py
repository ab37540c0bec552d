"""Precision as two fields: `DType`, the activations' element type, and `weight_format`, how weights are stored.

This is the one table from a dtype to its names in each library (CLI, ONNX/export.json, safetensors, numpy,
torch, TensorRT); everything else asks it. torch and numpy types resolve lazily so runners that need
neither import nothing heavy.
"""

from __future__ import annotations

import enum
from typing import Any

from .errors import Gemma4CompileError


class DType(enum.Enum):
    """Activation dtypes; the value is the CLI / export.json short name."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT64 = "int64"
    INT32 = "int32"
    BOOL = "bool"  # masks (the audio graph's input_features_mask)

    @property
    def onnx_name(self) -> str:
        """The name export.json tensor specs use ("float32", ...), as numpy spells it."""
        return _ONNX_NAMES[self]

    @property
    def safetensors_name(self) -> str:
        return _SAFETENSORS_NAMES[self]

    @property
    def onnx_elem_type(self) -> int:
        """onnx.TensorProto element type (what onnxruntime's OrtValue.element_type() reports)."""
        return _ONNX_ELEM[self]

    @property
    def trt_name(self) -> str:
        """tensorrt.DataType member name."""
        return _TRT_NAMES[self]

    @property
    def is_float(self) -> bool:
        return self in (DType.FP32, DType.FP16, DType.BF16)

    @property
    def torch(self) -> Any:
        import torch

        return getattr(
            torch, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(self.value, self.value)
        )

    @property
    def numpy(self) -> Any:
        """numpy dtype; bf16 is ml_dtypes' bfloat16 (a dependency of onnx)."""
        import numpy as np

        if self is DType.BF16:
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(self.onnx_name)

    @classmethod
    def parse(cls, name: Any) -> DType:
        """A DType from any of its names: "fp16", "float16", "F16", "HALF", torch.float16, a numpy dtype, an ONNX
        element type (10), or a DType."""
        if isinstance(name, DType):
            return name
        if isinstance(name, int) and name in _BY_ELEM:
            return _BY_ELEM[name]
        key = str(name).removeprefix("torch.")
        if key in _ALIASES:
            return _ALIASES[key]
        raise Gemma4CompileError(f"unsupported dtype {name!r}; expected one of {', '.join(FLOAT_CHOICES)}")


_ONNX_NAMES = {
    DType.FP32: "float32",
    DType.FP16: "float16",
    DType.BF16: "bfloat16",
    DType.INT64: "int64",
    DType.INT32: "int32",
    DType.BOOL: "bool",
}
_SAFETENSORS_NAMES = {
    DType.FP32: "F32",
    DType.FP16: "F16",
    DType.BF16: "BF16",
    DType.INT64: "I64",
    DType.INT32: "I32",
    DType.BOOL: "BOOL",
}
_ONNX_ELEM = {DType.FP32: 1, DType.FP16: 10, DType.BF16: 16, DType.INT64: 7, DType.INT32: 6, DType.BOOL: 9}
_TRT_NAMES = {
    DType.FP32: "FLOAT",
    DType.FP16: "HALF",
    DType.BF16: "BF16",
    DType.INT64: "INT64",
    DType.INT32: "INT32",
    DType.BOOL: "BOOL",
}
_BY_ELEM = {e: d for d, e in _ONNX_ELEM.items()}
_ALIASES: dict[str, DType] = {
    **{n: d for d, n in _TRT_NAMES.items()},
    **{d.value: d for d in DType},
    **{n: d for d, n in _ONNX_NAMES.items()},
    **{n: d for d, n in _SAFETENSORS_NAMES.items()},
}

FLOAT_CHOICES = ("fp32", "fp16", "bf16")  # what --dtype accepts

# How weights are stored: one of the float dtypes (weights in the activation dtype), or a weight-only quantized
# format (int4, int8: symmetric blockwise, quant/formats.py; export.json "quantization" has the block layout and
# which roles it covers). Next: fp8, nvfp4.
WEIGHT_FORMATS = (*FLOAT_CHOICES, "int4", "int8")


def weight_format_for(dtype: DType | str) -> str:
    """The default weight format of an export in `dtype`: weights stored as the activations are."""
    return DType.parse(dtype).value
