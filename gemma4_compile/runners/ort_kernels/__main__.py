"""python -m gemma4_compile.runners.ort_kernels: fetch onnxruntime's headers if needed, build, print the path."""

import sys

from . import KernelsUnavailable, build

try:
    print(build(fetch=True))
except KernelsUnavailable as e:
    sys.exit(f"error: {e}")
