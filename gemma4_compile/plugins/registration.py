"""The `gemma4` TensorRT plugin contract, its explicit registration and its fingerprint.

Each custom ONNX node `gemma4::<op>` (docs/export-format.md) maps to a plugin `<op>` in namespace `gemma4`,
version `1`. The ONNX parser hands the node's attributes to the creator as `PluginField`s, narrowing INT to
INT32 and FLOAT to FLOAT32, and only for names the creator lists. `PluginSpec` states that contract once;
`rtx.py` (TensorRT-RTX, Python IPluginV3) and `qdp.py` (full TensorRT, quickly deployable plugins) both read it.

Nothing registers at import: the entry point calls `register_plugins(trt)` with the TensorRT module it uses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from gemma4_compile.errors import BackendUnavailable, BuildError

NAMESPACE = "gemma4"
VERSION = "1"

PLUGIN_DIR = Path(__file__).resolve().parent


class PluginError(BuildError):
    """A `gemma4` plugin got fields it cannot use, or its registration clashes with another plugin."""


@dataclass(frozen=True)
class FieldSpec:
    """One plugin field: an ONNX attribute as the parser passes it (`dtype` is the numpy name)."""

    name: str
    dtype: str  # "int32" | "float32"

    @property
    def plugin_type(self) -> str:
        """The `PluginFieldType` member name the parser uses for this attribute."""
        return {"int32": "INT32", "float32": "FLOAT32"}[self.dtype]


@dataclass(frozen=True)
class PluginSpec:
    """I/O and fields of one `gemma4` plugin; outputs copy the shape and dtype of an input."""

    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    fields: tuple[FieldSpec, ...]
    output_like: tuple[int, ...]  # output i has the shape and dtype of inputs[output_like[i]]
    int64_inputs: tuple[int, ...] = ()  # every other input is an activation of the first input's dtype

    @property
    def plugin_id(self) -> str:
        return f"{NAMESPACE}::{self.op_type}"

    @property
    def num_io(self) -> int:
        return len(self.inputs) + len(self.outputs)

    def is_int64(self, pos: int) -> bool:
        """Whether I/O position `pos` (inputs first, then outputs) carries int64 lengths."""
        return pos < len(self.inputs) and pos in self.int64_inputs


ATTENTION = PluginSpec(
    op_type="SlidingWindowAttention",
    inputs=("q", "k", "v", "past_k", "past_v", "past_len", "seq_len"),
    outputs=("out", "present_k", "present_v"),
    fields=(FieldSpec("window", "int32"), FieldSpec("scale", "float32")),
    output_like=(0, 3, 4),
    int64_inputs=(5, 6),
)
MOE = PluginSpec(
    op_type="MoE",
    inputs=("x", "router_logits", "per_expert_scale", "gate_up", "down"),
    outputs=("y",),
    fields=(FieldSpec("top_k", "int32"),),
    output_like=(0,),
)
SPECS: tuple[PluginSpec, ...] = (ATTENTION, MOE)


def spec_for(op_type: str) -> PluginSpec:
    for spec in SPECS:
        if spec.op_type == op_type:
            return spec
    raise PluginError(f"no gemma4 plugin named '{op_type}'; known: {[s.op_type for s in SPECS]}")


def parse_fields(spec: PluginSpec, received: Iterable[tuple[str, str, np.ndarray]]) -> dict[str, int | float]:
    """(name, PluginFieldType name, data) as handed to a creator -> {field: python scalar}.

    Strict on purpose: a field of the wrong type means the ONNX attribute has the wrong type, which would
    otherwise turn into a silently wrong window or top-k.
    """
    got = {name: (type_name, np.asarray(data)) for name, type_name, data in received}
    unknown = sorted(set(got) - {f.name for f in spec.fields})
    if unknown:
        raise PluginError(f"{spec.plugin_id}: unexpected fields {unknown}")
    values: dict[str, int | float] = {}
    for field in spec.fields:
        if field.name not in got:
            raise PluginError(
                f"{spec.plugin_id}: missing field '{field.name}' (the ONNX node needs a '{field.name}' attribute)"
            )
        type_name, data = got[field.name]
        if type_name != field.plugin_type or data.size != 1:
            raise PluginError(
                f"{spec.plugin_id}: field '{field.name}' must be one {field.plugin_type}, "
                f"got {type_name} with {data.size} values"
            )
        scalar = data.reshape(-1)[0]
        values[field.name] = int(scalar) if field.dtype == "int32" else float(scalar)
    return values


def field_arrays(spec: PluginSpec, values: dict[str, int | float]) -> list[tuple[str, np.ndarray, str]]:
    """{field: scalar} -> (name, 1-element array, PluginFieldType name) for serialization."""
    return [(f.name, np.array([values[f.name]], dtype=f.dtype), f.plugin_type) for f in spec.fields]


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
    """Every Python file that defines plugin behaviour: this package, its kernels and the AOT compiler."""
    return sorted(p for p in PLUGIN_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def plugin_fingerprint() -> str:
    """sha256 over the plugin sources (relative path + bytes), for engine manifests."""
    digest = hashlib.sha256()
    for path in plugin_sources():
        digest.update(path.relative_to(PLUGIN_DIR).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()
