"""Export stage: Gemma 4 checkpoint -> ONNX graphs with `gemma4` custom nodes (see docs/export-format.md).

Names resolve on first use, so readers of export.json (engines/) do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .exporter import ExportedModel, export_checkpoint, export_spec
    from .manifest import ExportManifest

__all__ = ["ExportManifest", "ExportedModel", "export_checkpoint", "export_spec"]
_HOMES = {
    "ExportManifest": ".manifest",
    "ExportedModel": ".exporter",
    "export_checkpoint": ".exporter",
    "export_spec": ".exporter",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)
