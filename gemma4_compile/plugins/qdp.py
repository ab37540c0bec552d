"""Full-TensorRT quickly deployable plugins (`tensorrt.plugin`) for `gemma4::Attention` and `gemma4::MoE`.

Per op: `@trtp.register` (output shapes and dtypes), `@trtp.autotune` (type combinations) and
`@trtp.aot_impl` (Triton kernel compiled to PTX and embedded in the engine, so C++ runtimes and trtexec
run it without Python). The decorated functions exist only inside `register_qdp(trt)`, so this module
imports without TensorRT; the pure parts (attribute schema, autotune type strings, dims, launch
arithmetic) are plain functions tested on CPU.

Attributes are 1-D int32/float32 numpy arrays because the ONNX parser passes INT as INT32 and FLOAT as
FLOAT32, while QDP would declare a Python `int`/`float` as INT64/FLOAT64 and never match. AOT plugins do
not serialize their attributes, so window, scale and top_k are compiled into the kernel (constexpr) or
passed as int32 launch scalars.

No `from __future__ import annotations` here: QDP inspects the annotations as classes.

Contract with `gemma4_compile/plugins/aot.py` (the kernel engineer's; written against this expectation):
    compile_attention(*, dtype, head_dim, window, scale) -> AotKernel
    compile_moe(*, dtype, hidden, inter, experts, top_k) -> AotKernel
    AotKernel: .name (PTX entry), .ptx (str), .num_warps, .shared_mem,
               .grid(dims) -> (x, y, z) and .scalar_args(dims) -> [int32 scalars between the input and
               output pointers], where dims maps the ops.py letters (B, Hq, Hkv, S, C, D / T, H, E, I)
               to ints or `trtp.ShapeExpr`s (so the same arithmetic runs symbolically).
dtype is "fp32" | "fp16" | "bf16".
"""

import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from gemma4_compile.errors import BackendUnavailable

from .registration import ATTENTION, MOE, NAMESPACE, SPECS, PluginError, PluginSpec

QDP_UNAVAILABLE = "needs full TensorRT (tensorrt.plugin), not installable from PyPI"
ACTIVATION_TYPES = ("FP32", "FP16", "BF16")  # AutoTuneCombination names; '|' ties them across positions
TRITON_DTYPES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}  # trt.DataType name -> Triton/aot.py name


# ----- pure parts (CPU-tested) ------------------------------------------------------------------


def autotune_types(spec: PluginSpec, activation: Sequence[str] = ACTIVATION_TYPES) -> str:
    """`AutoTuneCombination` type string: activations share one dtype ('|' is dependent), lengths INT64."""
    tied = "|".join(activation)
    return ", ".join("INT64" if spec.is_int64(pos) else tied for pos in range(spec.num_io))


def attr_scalar(values: np.ndarray, name: str) -> int | float:
    """A one-element attribute array -> python scalar."""
    flat = np.asarray(values).reshape(-1)
    if flat.size != 1:
        raise PluginError(f"attribute '{name}' must hold one value, got {flat.size}")
    return flat[0].item()


def attention_dims(q: Sequence[Any], k: Sequence[Any], past_k: Sequence[Any]) -> dict[str, Any]:
    """Letters of ops.py from q [B,Hq,S,D], k [B,Hkv,S,D], past_k [B,Hkv,C,D] (ints or ShapeExprs)."""
    return {"B": q[0], "Hq": q[1], "S": q[2], "D": q[3], "Hkv": k[1], "C": past_k[2]}


def moe_dims(x: Sequence[Any], router_logits: Sequence[Any], down: Sequence[Any]) -> dict[str, Any]:
    """Letters of ops.py from x [T,H], router_logits [T,E], down [E,H,I]."""
    return {"T": x[0], "H": x[1], "E": router_logits[1], "I": down[2]}


def static(dim: Any, what: str) -> int:
    """A dimension the kernel is compiled for (head dim, hidden, ...): an int or a constant ShapeExpr."""
    if isinstance(dim, (int, np.integer)):
        return int(dim)
    if not dim.is_fake and dim.is_constant:
        return int(dim.constant_value())
    raise PluginError(f"{what} must be static to compile the AOT kernel; it is dynamic in this network")


def triton_dtype(type_name: str) -> str:
    if type_name not in TRITON_DTYPES:
        raise PluginError(f"no gemma4 kernel for dtype {type_name}; supported: {sorted(TRITON_DTYPES)}")
    return TRITON_DTYPES[type_name]


# ----- registration (needs tensorrt.plugin) -----------------------------------------------------


def qdp_module(trt: ModuleType) -> ModuleType:
    """`<trt>.plugin`, or BackendUnavailable saying why there is none."""
    try:
        return importlib.import_module(f"{trt.__name__}.plugin")
    except ImportError as exc:
        raise BackendUnavailable(f"gemma4 QDP plugins {QDP_UNAVAILABLE} ({exc})") from exc


def is_registered(trtp: ModuleType, spec: PluginSpec) -> bool:
    namespace = getattr(trtp.op, NAMESPACE, None)
    return namespace is not None and hasattr(namespace, spec.op_type)


def register_qdp(trt: ModuleType) -> list[str]:
    """Define the `gemma4` QDPs in `trt.plugin` (idempotent: QDP forbids defining a name twice)."""
    trtp = qdp_module(trt)
    definers: dict[str, Callable[[ModuleType], None]] = {"Attention": _define_attention, "MoE": _define_moe}
    for spec in SPECS:
        if not is_registered(trtp, spec):
            definers[spec.op_type](trtp)
    return [spec.plugin_id for spec in SPECS]


def kernel_launch(trtp: ModuleType, kernel: Any, dims: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """aot.py's compiled kernel -> the (name, PTX, KernelLaunchParams, SymIntExprs) `aot_impl` returns."""
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = kernel.grid(dims)
    params.block_x = kernel.num_warps * 32
    params.shared_mem = kernel.shared_mem
    scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(a) for a in kernel.scalar_args(dims)])
    return kernel.name, kernel.ptx, params, scalars


def _define_attention(trtp: ModuleType) -> None:
    TensorDesc = trtp.TensorDesc  # a class: the annotations below must be real classes

    @trtp.register(ATTENTION.plugin_id)
    def attention_desc(
        q: TensorDesc, k: TensorDesc, v: TensorDesc, past_k: TensorDesc, past_v: TensorDesc,
        past_len: TensorDesc, seq_len: TensorDesc,
        window: npt.NDArray[np.int32], scale: npt.NDArray[np.float32],
    ) -> tuple[TensorDesc, TensorDesc, TensorDesc]:  # fmt: skip
        return q.like(), past_k.like(), past_v.like()  # = ATTENTION.output_like

    @trtp.autotune(ATTENTION.plugin_id)
    def attention_autotune(
        q, k, v, past_k, past_v, past_len, seq_len, outputs
    ) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(autotune_types(ATTENTION))]

    @trtp.aot_impl(ATTENTION.plugin_id)
    def attention_aot(
        q: TensorDesc, k: TensorDesc, v: TensorDesc, past_k: TensorDesc, past_v: TensorDesc,
        past_len: TensorDesc, seq_len: TensorDesc,
        window: npt.NDArray[np.int32], scale: npt.NDArray[np.float32],
        outputs: tuple[TensorDesc, TensorDesc, TensorDesc], tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:  # fmt: skip
        from . import aot

        dims = attention_dims(q.shape_expr, k.shape_expr, past_k.shape_expr)
        kernel = aot.compile_attention(
            dtype=triton_dtype(q.dtype.name),
            head_dim=static(dims["D"], "head dim D"),
            window=int(attr_scalar(window, "window")),
            scale=float(attr_scalar(scale, "scale")),
        )
        return kernel_launch(trtp, kernel, dims)


def _define_moe(trtp: ModuleType) -> None:
    TensorDesc = trtp.TensorDesc

    @trtp.register(MOE.plugin_id)
    def moe_desc(
        x: TensorDesc, router_logits: TensorDesc, per_expert_scale: TensorDesc, gate_up: TensorDesc,
        down: TensorDesc, top_k: npt.NDArray[np.int32],
    ) -> TensorDesc:  # fmt: skip
        return x.like()  # = MOE.output_like

    @trtp.autotune(MOE.plugin_id)
    def moe_autotune(
        x, router_logits, per_expert_scale, gate_up, down, outputs
    ) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(autotune_types(MOE))]

    @trtp.aot_impl(MOE.plugin_id)
    def moe_aot(
        x: TensorDesc, router_logits: TensorDesc, per_expert_scale: TensorDesc, gate_up: TensorDesc,
        down: TensorDesc, top_k: npt.NDArray[np.int32], outputs: tuple[TensorDesc], tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:  # fmt: skip
        from . import aot

        dims = moe_dims(x.shape_expr, router_logits.shape_expr, down.shape_expr)
        kernel = aot.compile_moe(
            dtype=triton_dtype(x.dtype.name),
            hidden=static(dims["H"], "hidden size H"),
            inter=static(dims["I"], "expert width I"),
            experts=static(dims["E"], "expert count E"),
            top_k=int(attr_scalar(top_k, "top_k")),
        )
        return kernel_launch(trtp, kernel, dims)
