"""Weight-only quantization (`export --quant int4|int8`): formats and roles (formats.py), round-to-nearest
symmetric per-block codes packed for com.microsoft.MatMulNBits (rtn.py), and the fake-quant PyTorch reference
validation compares a quantized export with (reference.py). The exporter writes the codes in its streaming weight
writer (export/weights.py) and rewrites the MatMuls with passes/quantize_matmul.py.

Importing this package imports neither torch nor numpy.
"""
