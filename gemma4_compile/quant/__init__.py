"""Weight-only quantization (`export --quant int4|int8|fp8|nvfp4`): formats, roles and overrides
(formats.py), integer round-to-nearest codes (rtn.py), FP8 E4M3 and NVFP4 codes (floats.py), one entry point
per direction for the writer and the reference (encode.py), per-role sizes for `inspect` (sizes.py),
the fake-quant PyTorch reference validation compares a quantized export with (reference.py), and the reading of
pre-quantized compressed-tensors int4 checkpoints, whose codes are exported as stored (imported.py). The exporter
writes the codes in its streaming weight writer (export/weights.py) and rewrites the graph with
passes/quantize_matmul.py.

Importing this package imports neither torch nor numpy.
"""
