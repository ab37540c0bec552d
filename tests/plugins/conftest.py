"""Kernel tests run the Triton kernels on the CPU interpreter unless TRITON_INTERPRET=0 is set on a GPU machine.

`triton.jit` reads TRITON_INTERPRET when a kernel is decorated, so this must run before any kernel module is
imported; pytest imports this conftest before the test modules of this folder.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
