"""gemma4-compile: Gemma 4 checkpoints to ONNX and TensorRT engines, validated against PyTorch."""

__version__ = "0.1.0"
