"""The `gemma4` TensorRT plugin contract, its explicit registration and its fingerprint.

Each custom ONNX node `gemma4::<op>` (docs/export-format.md) maps to a plugin `<op>` in namespace `gemma4`,
version `1`. The ONNX parser hands the node's attributes to the creator as `PluginField`s, narrowing INT to
INT32 and FLOAT to FLOAT32, and only for names the creator lists. Each op's contract (`gemma4_compile.ops`)
states that once; `rtx.py` (TensorRT-RTX, Python IPluginV3) and `qdp.py` (full TensorRT, quickly deployable
plugins) both read it, and neither imports this module (it imports them, to register).

Nothing registers at import: the entry point calls `register_plugins(trt)` with the TensorRT module it uses.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import ModuleType

from .. import ops
from ..errors import BackendUnavailable
from ..ops.attention import SLIDING_WINDOW_ATTENTION
from ..ops.contract import (
    PLUGIN_NAMESPACE as NAMESPACE,
)
from ..ops.contract import (
    PLUGIN_VERSION as VERSION,
)
from ..ops.contract import (
    FieldSpec,
    OpContract,
    PluginError,
    field_arrays,
    parse_fields,
)
from ..ops.moe import MOE

__all__ = [
    "ATTENTION",
    "MOE",
    "NAMESPACE",
    "SPECS",
    "VERSION",
    "FieldSpec",
    "PluginError",
    "PluginSpec",
    "field_arrays",
    "parse_fields",
    "plugin_fingerprint",
    "register_plugins",
    "spec_for",
]

PLUGIN_DIR = Path(__file__).resolve().parent
OPS_DIR = Path(ops.__file__).resolve().parent

PluginSpec = OpContract  # a plugin's I/O and fields are its op's contract
ATTENTION = SLIDING_WINDOW_ATTENTION
SPECS: tuple[OpContract, ...] = tuple(e.contract for e in ops.with_plugin("rtx"))  # the fused ops


def spec_for(op_type: str) -> OpContract:
    """The contract of a fused op with a plugin (the MoE stages are `moe_stages.STAGES`)."""
    specs = {s.op_type: s for s in SPECS}
    if op_type not in specs:
        raise PluginError(f"no gemma4 plugin named '{op_type}'; known: {list(specs)}")
    return specs[op_type]


def register_plugins(trt_module: ModuleType, kernels_dir: Path | None = None) -> list[str]:
    """Register the `gemma4` plugins with `trt_module` (tensorrt_rtx or tensorrt); returns their ids.

    kernels_dir: a `gemma4-compile kernels` output, where full TensorRT's AOT plugins find (or add) their
    compiled kernels. Idempotent: a second call registers nothing new and returns the same ids.
    """
    backend = trt_module.__name__.split(".")[0]
    if backend == "tensorrt_rtx":
        from . import rtx

        return rtx.register(trt_module)
    if backend in ("tensorrt", "tensorrt_bindings"):
        from . import qdp

        return qdp.register_qdp(trt_module, cache_dir=kernels_dir)
    raise BackendUnavailable(
        f"register_plugins: expected the 'tensorrt' or 'tensorrt_rtx' module, got '{trt_module.__name__}'"
    )


def plugin_sources() -> list[Path]:
    """Every Python file of this package that defines plugin behaviour: plugins, kernels, the AOT compiler."""
    return _sources(PLUGIN_DIR)


def _sources(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def plugin_fingerprint() -> str:
    """sha256 over the plugin sources and the op contracts they read (relative path + bytes), for manifests."""
    digest = hashlib.sha256()
    for prefix, root in (("", PLUGIN_DIR), ("ops/", OPS_DIR)):
        for path in _sources(root):
            digest.update((prefix + path.relative_to(root).as_posix()).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()
