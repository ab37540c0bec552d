"""Export stage: Gemma 4 checkpoint -> ONNX graphs with `gemma4` custom nodes (see docs/export-format.md)."""

from .exporter import ExportedModel, export_checkpoint, export_spec
from .manifest import ExportManifest

__all__ = ["ExportManifest", "ExportedModel", "export_checkpoint", "export_spec"]
