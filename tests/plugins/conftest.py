"""Kernel tests run the Triton kernels on the CPU interpreter unless TRITON_INTERPRET=0 is set on a GPU machine.

`triton.jit` reads TRITON_INTERPRET when a kernel is decorated, so this must run before any kernel module is
imported; pytest imports this conftest before the test modules of this folder.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


def _bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: widening the bit pattern is exact (NaN, inf, subnormals too)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.fixture(autouse=True)
def interpreter_bf16_dot(monkeypatch):
    """The interpreter stores bfloat16 as uint16 and its `tl.dot` multiplies those bit patterns
    (triton-lang/triton#11584; maintainers: bf16 is not supported by the interpreter yet). Widen bf16
    operands to fp32 first, as the fix proposed there (#11585) does: a bf16 MMA multiplies exactly and
    accumulates in fp32, so the kernels under test keep the very rounding points they have on a GPU."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    pytest.importorskip("triton")
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = interpreter.TensorHandle(_bf16_bits_to_fp32(a.data), tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = interpreter.TensorHandle(_bf16_bits_to_fp32(b.data), tl.float32)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
