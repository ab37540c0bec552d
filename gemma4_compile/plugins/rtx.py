"""TensorRT-RTX plugins for `gemma4::SlidingWindowAttention` and `gemma4::MoE`: Python IPluginV3 + IPluginCreatorV3One.

TensorRT-RTX imports only V3 plugins made by an `IPluginCreatorV3One`, and its Python network API has no
`add_plugin*`, so a plugin enters an RTX network only through the ONNX parser (node attribute
`plugin_namespace="gemma4"`). One plugin class serves every op the registry gives an "rtx" plugin; the op's contract
(`gemma4_compile.ops`) supplies the I/O rules and fields, its registry entry the kernel.

Build side (shapes, types, formats, fields) runs on a CPU: the RTX builder makes an AOT engine without a
GPU. Runtime side (`enqueue`) launches the Triton kernels of `plugins/kernels` through torch on TensorRT's
stream, so it needs a GPU, and deserializing the engine needs Python with this module registered.

TensorRT-RTX 1.7.1 packaging bug: when its ONNX parser imports a plugin node it dlopens the unversioned
`libtensorrt_rtx.so`, but the wheel ships only `libtensorrt_rtx.so.1`. The failed load throws inside a
noexcept region and the process dies with "terminate called without an active exception". `register`
refuses to register while that name cannot be loaded; `parser_library_env` gives a subprocess a fixed
environment.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from gemma4_compile.errors import BackendUnavailable

from .. import ops
from ..ops.contract import OpContract, PluginError, field_arrays, parse_fields

PARSER_LIBRARY = "libtensorrt_rtx.so"
ACTIVATION_TYPES = ("FLOAT", "HALF", "BF16")  # trt.DataType member names the kernels take

# The registry keeps raw pointers to Python creators: they must live as long as the process.
_CREATORS: dict[str, list[Any]] = {}


# ----- registration -----------------------------------------------------------------------------


def register(trt: ModuleType) -> list[str]:
    """Register one creator per `gemma4` op with TensorRT-RTX's registry (idempotent); returns plugin ids."""
    problem = missing_parser_library()
    if problem:
        raise BackendUnavailable(problem)
    registry = trt.get_plugin_registry()
    creator_class = plugin_classes(trt)[1]
    ids = []
    for spec in specs():
        existing = registry.get_creator(spec.op_type, spec.plugin_version, spec.plugin_namespace)
        if existing is None:
            creator = creator_class(spec)
            if not registry.register_creator(creator, spec.plugin_namespace):
                raise PluginError(f"TensorRT-RTX refused to register {spec.plugin_id}")
            _CREATORS.setdefault(trt.__name__, []).append(creator)
        elif not isinstance(existing, creator_class):
            raise PluginError(
                f"{spec.plugin_id} is already registered by {type(existing).__name__}, not by gemma4_compile"
            )
        ids.append(spec.plugin_id)
    return ids


def creators(trt: ModuleType) -> list[Any]:
    """Fresh, unregistered creators for every `gemma4` op (register them yourself, and keep them alive)."""
    creator_class = plugin_classes(trt)[1]
    return [creator_class(spec) for spec in specs()]


def specs() -> list[OpContract]:
    """The contracts of the ops with a TensorRT-RTX plugin, in registry order."""
    return [e.contract for e in ops.with_plugin("rtx")]


# ----- the parser's library lookup --------------------------------------------------------------


def loaded_library() -> Path | None:
    """Path of the `libtensorrt_rtx.so.N` this process has loaded (None before `import tensorrt_rtx`)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    for line in maps.read_text().splitlines():
        path = Path(line.split(maxsplit=5)[-1])
        if path.name.startswith(PARSER_LIBRARY + "."):
            return path
    return None


def missing_parser_library() -> str | None:
    """None when the RTX parser can load `libtensorrt_rtx.so`; otherwise why not and how to fix it."""
    if not sys.platform.startswith("linux"):
        return None
    loaded = loaded_library()
    if loaded is None or (loaded.parent / PARSER_LIBRARY).exists():  # the parser's RPATH is $ORIGIN
        return None
    try:
        ctypes.CDLL(PARSER_LIBRARY)  # the rest of the parser's search: LD_LIBRARY_PATH, ld.so cache, /usr/lib
    except OSError:
        return (
            f"TensorRT-RTX's ONNX parser loads '{PARSER_LIBRARY}' when it imports a plugin node, but only "
            f"'{loaded.name}' exists in {loaded.parent}; the failed load would kill this process "
            f"(std::terminate). Fix: `ln -s {loaded.name} {loaded.parent / PARSER_LIBRARY}`, or start Python "
            f"with LD_LIBRARY_PATH holding such a link (gemma4_compile.plugins.rtx.parser_library_env)."
        )
    return None


def parser_library_env(link_dir: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a subprocess whose RTX parser can load `libtensorrt_rtx.so` (link made in `link_dir`).

    Only a new process helps: the loader reads LD_LIBRARY_PATH once, at startup.
    """
    import tensorrt_rtx  # noqa: F401  (loads the library so its path can be found)

    loaded = loaded_library()
    if loaded is None:
        raise BackendUnavailable("tensorrt_rtx is imported but no libtensorrt_rtx.so.N is mapped")
    link_dir.mkdir(parents=True, exist_ok=True)
    link = link_dir / PARSER_LIBRARY
    if not link.exists():
        link.symlink_to(loaded)
    env = dict(os.environ if env is None else env)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(link_dir), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


# ----- build-time rules (pure) ------------------------------------------------------------------


def supports(
    spec: OpContract,
    pos: int,
    type_name: str,
    first_type_name: str,
    linear: bool,
    num_inputs: int | None = None,
) -> bool:
    """supports_format_combination for a node with `num_inputs` inputs (None: the required ones): linear
    only; lengths and block ids int64; activations all of q's (or x's) dtype."""
    if not linear:
        return False
    if spec.is_int64(pos, num_inputs):
        return type_name == "INT64"
    if pos == 0:
        return type_name in ACTIVATION_TYPES
    return type_name == first_type_name


def describe(values: dict[str, int | float]) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items())


# ----- runtime glue -----------------------------------------------------------------------------


def kernel_impl(op_type: str) -> Callable[..., Any]:
    """The op's Triton torch wrapper (registry entry `kernel`), imported on first use (it needs a GPU to run);
    UnknownOpError for an op without one."""
    return ops.part(op_type, "kernel")


def run_op(
    spec: OpContract,
    values: dict[str, int | float],
    inputs: Sequence[Any],
    outputs: Sequence[Any],
    impl: Callable[..., Any] | None = None,
) -> None:
    """Call the op on torch tensors and copy its results into TensorRT's output buffers: the required inputs
    by position, then the fields and the optional inputs the node has (attention's block_ids) by name."""
    impl = impl or kernel_impl(spec.op_type)
    required = len(spec.plugin_inputs())
    optional = {p.name: t for p, t in zip(spec.plugin_inputs(len(inputs))[required:], inputs[required:])}
    results = impl(*inputs[:required], **values, **optional)
    results = tuple(results) if isinstance(results, (tuple, list)) else (results,)
    if len(results) != len(outputs):
        raise PluginError(
            f"{spec.plugin_id}: kernel returned {len(results)} tensors, expected {len(outputs)}"
        )
    for dst, src in zip(outputs, results):
        dst.copy_(src)


_TYPESTR = {"FLOAT": "<f4", "HALF": "<f2", "BF16": "<i2", "INT64": "<i8", "INT32": "<i4"}


class _CudaBuffer:
    """A TensorRT device buffer seen through __cuda_array_interface__ (no copy)."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str):
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": typestr,
            "data": (int(ptr), False),
            "version": 3,
            "strides": None,
        }


def device_tensor(ptr: int, shape: Sequence[int], type_name: str) -> Any:
    """Wrap a TensorRT device pointer as a torch CUDA tensor; bf16 travels as int16 (the interface lacks it)."""
    import torch

    tensor = torch.as_tensor(_CudaBuffer(ptr, tuple(shape), _TYPESTR[type_name]), device="cuda")
    return tensor.view(torch.bfloat16) if type_name == "BF16" else tensor


def _launch(
    spec: OpContract, values: dict[str, int | float], input_desc, output_desc, inputs, outputs, stream
) -> None:
    import torch

    ins = [device_tensor(p, tuple(d.dims), d.type.name) for p, d in zip(inputs, input_desc)]
    outs = [device_tensor(p, tuple(d.dims), d.type.name) for p, d in zip(outputs, output_desc)]
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        run_op(spec, values, ins, outs)


# ----- the IPluginV3 classes, bound to one TensorRT module --------------------------------------


@functools.cache
def plugin_classes(trt: ModuleType) -> tuple[type, type]:
    """(plugin class, creator class) subclassing `trt`'s V3 interfaces; built once per module."""

    class Gemma4Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, spec: OpContract, values: dict[str, int | float], received: dict[str, str]):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            # Python plugins must set every attribute of the interfaces they implement.
            self.plugin_name = spec.op_type
            self.plugin_namespace = spec.plugin_namespace
            self.plugin_version = spec.plugin_version
            self.num_outputs = len(spec.outputs)
            self.timing_cache_id = describe(values)  # window/top_k change the work, not just the shapes
            self.metadata_string = f"{spec.plugin_id} {describe(values)}"
            self.spec = spec
            self.values = dict(values)
            self.received = dict(received)  # field -> PluginFieldType name, as the creator got them
            self.tactic = 0

        def get_capability_interface(self, type):
            return self

        def clone(self):
            return Gemma4Plugin(self.spec, self.values, self.received)

        def destroy(self):
            pass

        # IPluginV3OneBuild
        def get_output_data_types(self, input_types):
            return [input_types[i] for i in self.spec.output_like]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[i]) for i in self.spec.output_like]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            linear = desc.format == trt.TensorFormat.LINEAR
            return supports(self.spec, pos, desc.type.name, in_out[0].desc.type.name, linear, num_inputs)

        def configure_plugin(self, inp, out):
            self.spec.plugin_inputs(len(inp))  # a PluginError for an input count the op cannot have
            if len(out) != len(self.spec.outputs):
                raise PluginError(
                    f"{self.spec.plugin_id}: expected {len(self.spec.outputs)} outputs, got {len(out)}"
                )

        def get_workspace_size(self, inp, out):
            return 0

        def get_valid_tactics(self):
            return []

        # IPluginV3OneRuntime
        def set_tactic(self, tactic):
            self.tactic = tactic

        def on_shape_change(self, inp, out):
            pass

        def attach_to_context(self, resource_context):
            return self.clone()

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection(
                [
                    trt.PluginField(name, data, getattr(trt.PluginFieldType, type_name))
                    for name, data, type_name in field_arrays(self.spec, self.values)
                ]
            )

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            _launch(self.spec, self.values, input_desc, output_desc, inputs, outputs, stream)

    class Gemma4PluginCreator(trt.IPluginCreatorV3One):
        def __init__(self, spec: OpContract):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = spec.op_type
            self.plugin_namespace = spec.plugin_namespace
            self.plugin_version = spec.plugin_version
            self.spec = spec
            # The parser forwards only the attributes named here.
            self.field_names = trt.PluginFieldCollection(
                [
                    trt.PluginField(name, data[:0], getattr(trt.PluginFieldType, type_name))
                    for name, data, type_name in field_arrays(spec, {f.name: 0 for f in spec.fields})
                ]
            )

        def create_plugin(self, name, field_collection, phase):
            received = [(f.name, f.type.name, f.data) for f in field_collection]
            values = parse_fields(self.spec, received)
            return Gemma4Plugin(self.spec, values, {n: t for n, t, _ in received})

    return Gemma4Plugin, Gemma4PluginCreator
