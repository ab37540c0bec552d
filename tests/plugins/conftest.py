"""Kernel tests run the Triton kernels on the CPU interpreter unless TRITON_INTERPRET=0 is set on a GPU machine.

`triton.jit` reads TRITON_INTERPRET when a function is decorated, so the flag must be set before the kernel
modules are imported; pytest imports this conftest before the test modules of this folder. Triton's own
library (`tl.cdiv`, `tl.max`, `tl.cumsum`, ...) may have been decorated earlier, though: collecting other
folders imports torch._dynamo, which imports triton.language before this file runs. The fixtures below make
the interpreter cope with that and with its missing bfloat16 `tl.dot`; both are no-ops on a GPU run.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: widening the bit pattern is exact (NaN, inf, subnormals too)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.fixture(autouse=True)
def interpreter_bf16_dot(monkeypatch):
    """The interpreter stores bfloat16 as uint16 and its `tl.dot` multiplies those bit patterns
    (triton-lang/triton#11584; maintainers: bf16 is not supported by the interpreter yet). Widen bf16
    operands to fp32 first, as the fix proposed there (#11585) does: a bf16 MMA multiplies exactly and
    accumulates in fp32, so the kernels under test keep the very rounding points they have on a GPU."""
    if not _interpreting():
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


@pytest.fixture(autouse=True)
def interpreter_late_flag(monkeypatch):
    """If triton.language was imported before TRITON_INTERPRET was set, its library functions are compiled-mode
    JITFunctions, which refuse to be called ("outside of the scope of a kernel"). Run them the way the
    interpreter runs its own device functions. Our kernel modules must still be imported after the flag."""
    if not _interpreting() or "triton.language" not in sys.modules:
        return
    import triton.language as tl
    from triton.runtime import jit
    from triton.runtime.interpreter import InterpretedFunction

    for name in ("attention", "moe"):
        module = sys.modules.get(f"gemma4_compile.plugins.kernels.{name}")
        if module is not None and any(isinstance(v, jit.JITFunction) for v in vars(module).values()):
            pytest.fail(
                f"kernels.{name} was imported before TRITON_INTERPRET=1 was set; set it in tests/conftest.py"
            )
    if not isinstance(tl.cdiv, jit.JITFunction):
        return  # triton.language was imported with the flag on: nothing to repair
    interpreted: dict = {}

    def call(self, *args, **kwargs):
        fn = interpreted.get(self.fn) or interpreted.setdefault(self.fn, InterpretedFunction(self.fn))
        return fn(*args, **kwargs)

    monkeypatch.setattr(jit.JITFunction, "__call__", call)
