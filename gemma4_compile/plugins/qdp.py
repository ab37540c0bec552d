"""Full-TensorRT quickly deployable plugins (`tensorrt.plugin`) for `gemma4::SlidingWindowAttention` and `gemma4::MoE`.

Per op: `@trtp.register` (output shapes and dtypes), `@trtp.autotune` (type combinations) and
`@trtp.aot_impl` (a Triton kernel compiled to PTX and embedded in the engine, so C++ runtimes and trtexec
run it without Python). The decorated functions exist only inside `register_qdp(trt)`, so this module
imports without TensorRT; the pure parts (autotune type strings, dims, kernel config, launch arithmetic)
are plain functions tested on CPU.

Attributes are 1-D int32/float32 numpy arrays because the ONNX parser passes INT as INT32 and FLOAT as
FLOAT32, while QDP would declare a Python `int`/`float` as INT64/FLOAT64 and never match. AOT plugins do
not serialize their attributes, so scale is compiled into the kernel (constexpr) and window is an int32
launch scalar.

An AOT plugin launches exactly one kernel. Attention uses aot.py's `attn_fwd` with FUSE_RING (attention
and the ring presents in one launch, prefill and decode alike; the split decode path needs three launches
and stays with the Python plugin). Kernels come from `aot.compile_variants` (cached by content under
AOT_CACHE) and launch by `aot.KERNELS[name].launch`, whose arithmetic runs on TensorRT shape expressions:
every tensor dim is passed as a ShapeExpr (ShapeExpr * int works, int * ShapeExpr does not), only the
GQA group and the window as ints. MoE expects aot.py to gain a `moe` kernel and kernels/moe.py an
`aot_config(dims, dtype, max_shared_bytes) -> (constexprs, num_warps, num_stages)`; until then its
aot_impl fails with a PluginError naming the missing piece.

Unverified without a GPU and full TensorRT: Triton appends two scratch-pointer parameters to every PTX
entry, which TensorRT's AOT launch (input pointers, int32 scalars, output pointers) does not list.

No `from __future__ import annotations` here: QDP inspects the annotations as classes.
"""

import importlib
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from gemma4_compile.errors import BackendUnavailable

from .registration import ATTENTION, MOE, NAMESPACE, SPECS, PluginError, PluginSpec

QDP_UNAVAILABLE = "needs full TensorRT (tensorrt.plugin), not installable from PyPI"
ACTIVATION_TYPES = ("FP32", "FP16", "BF16")  # AutoTuneCombination names; '|' ties them across positions
TRITON_DTYPES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}  # trt.DataType name -> aot.py dtype
ATTENTION_KERNEL = "attn_fwd"
MOE_KERNEL = "moe"  # not in aot.KERNELS yet: kernels/moe.py is still to come
AOT_CACHE = Path(tempfile.gettempdir()) / "gemma4_compile_aot"


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


def static(dim: Any, what: str) -> int:
    """A dimension a kernel is compiled for (head dim, head counts, ...): an int or a constant ShapeExpr."""
    if isinstance(dim, (int, np.integer)):
        return int(dim)
    if not dim.is_fake and dim.is_constant:
        return int(dim.constant_value())
    raise PluginError(f"{what} must be static to compile the AOT kernel; it is dynamic in this network")


def attention_dims(q: Sequence[Any], k: Sequence[Any], past_k: Sequence[Any], window: int) -> dict[str, Any]:
    """aot.py's `attn_fwd` dims from q [B,Hq,S,D], k [B,Hkv,S,D], past_k [B,Hkv,C,D] (ints or ShapeExprs)."""
    group = static(q[1], "query heads Hq") // static(k[1], "KV heads Hkv")
    return {
        "B": q[0],
        "Hq": q[1],
        "Hkv": k[1],
        "G": group,
        "S": q[2],
        "C": past_k[2],
        "D": q[3],
        "window": window,
    }


def moe_dims(
    x: Sequence[Any], router_logits: Sequence[Any], down: Sequence[Any], top_k: int
) -> dict[str, Any]:
    """The ops.py letters from x [T,H], router_logits [T,E], down [E,H,I], plus top_k."""
    return {"T": x[0], "H": x[1], "E": router_logits[1], "I": down[2], "top_k": top_k}


def triton_dtype(type_name: str) -> str:
    if type_name not in TRITON_DTYPES:
        raise PluginError(f"no gemma4 kernel for dtype {type_name}; supported: {sorted(TRITON_DTYPES)}")
    return TRITON_DTYPES[type_name]


def attention_config(
    head_dim: int, group: int, dtype: str, scale: float, max_shared_bytes: int
) -> tuple[dict[str, Any], int, int]:
    """(constexprs, num_warps, num_stages) of the fused attention launch for one layer on one target.

    Same choice as kernels.attention's wrapper on a GPU: the first block config that holds a whole GQA
    group and fits the target's shared memory.
    """
    import torch

    from .kernels import attention as kernels

    confs = [c for c in kernels.fwd_configs(head_dim) if c.kwargs["BLOCK_M"] >= group]
    conf = next((c for c in confs if kernels.keep_fwd(c, head_dim, max_shared_bytes)), confs[-1])
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    constexprs = {
        "HEAD_DIM": head_dim, **conf.kwargs, "SCALE": scale, "FUSE_RING": True,
        "BLOCK_R": kernels.ring_block(head_dim), "INPUT_PRECISION": kernels.input_precision(torch_dtype),
    }  # fmt: skip
    return constexprs, conf.num_warps, conf.num_stages


def aot_kernel(kernel: str) -> Any:
    """aot.py's KernelSpec for `kernel`, or a PluginError listing the kernels it has."""
    from . import aot

    if kernel not in aot.KERNELS:
        raise PluginError(f"aot.py has no '{kernel}' kernel; known: {sorted(aot.KERNELS)}")
    return aot.KERNELS[kernel]


def launch_values(kernel: str, dims: Mapping[str, Any], constexprs: Mapping[str, Any]) -> tuple[tuple, list]:
    """(grid, int32 scalars) of an aot.py kernel; symbolic when `dims` hold ShapeExprs."""
    launch = aot_kernel(kernel).launch
    return launch.grid(dims, constexprs), launch.scalars(dims, constexprs)


def compile_kernel(
    kernel: str, target: str, dtype: str, constexprs: Mapping[str, Any], num_warps: int, num_stages: int
) -> tuple[Any, str]:
    """(aot.KernelEntry, PTX text) for one variant, compiled once into AOT_CACHE."""
    from . import aot

    variant = aot.Variant.make(kernel, target, dtype, constexprs, num_warps, num_stages)
    (entry,) = aot.compile_variants(AOT_CACHE, [variant], jobs=1)
    return entry, (AOT_CACHE / entry.ptx).read_text()


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


def register_qdp(trt: ModuleType, target: str = "native") -> list[str]:
    """Define the `gemma4` QDPs in `trt.plugin` (idempotent: QDP forbids defining a name twice).

    `target` (an engines.targets name; "native" = this machine's GPU) is what the AOT kernels are
    compiled for, resolved when TensorRT asks for them during the build.
    """
    trtp = qdp_module(trt)
    definers: dict[str, Callable[[ModuleType, str], None]] = {
        "SlidingWindowAttention": _define_attention,
        "MoE": _define_moe,
    }
    for spec in SPECS:
        if not is_registered(trtp, spec):
            definers[spec.op_type](trtp, target)
    return [spec.plugin_id for spec in SPECS]


def _aot_result(
    trtp: ModuleType, kernel: str, target: str, dtype: str, dims, constexprs, warps, stages
) -> tuple:
    """Compile and describe one launch: the (name, PTX, KernelLaunchParams, SymIntExprs) aot_impl returns."""
    entry, ptx = compile_kernel(kernel, target, dtype, constexprs, warps, stages)
    grid, scalars = launch_values(kernel, dims, constexprs)
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = grid
    params.block_x = entry.threads
    params.shared_mem = entry.shared_bytes
    return entry.entry, ptx, params, trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in scalars])


def _define_attention(trtp: ModuleType, target: str) -> None:
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
        from ..engines.targets import resolve_target

        gpu = resolve_target(target)
        dtype = triton_dtype(q.dtype.name)
        dims = attention_dims(
            q.shape_expr, k.shape_expr, past_k.shape_expr, int(attr_scalar(window, "window"))
        )
        head_dim = static(dims["D"], "head dim D")
        constexprs, warps, stages = attention_config(
            head_dim, dims["G"], dtype, float(attr_scalar(scale, "scale")), gpu.max_shared_bytes
        )
        return _aot_result(trtp, ATTENTION_KERNEL, gpu.name, dtype, dims, constexprs, warps, stages)


def _define_moe(trtp: ModuleType, target: str) -> None:
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
        from ..engines.targets import resolve_target

        aot_kernel(MOE_KERNEL)  # names the gap while aot.py has no MoE kernel
        from .kernels import moe as kernels  # expected: aot_config(dims, dtype, max_shared_bytes)

        gpu = resolve_target(target)
        dtype = triton_dtype(x.dtype.name)
        dims = moe_dims(
            x.shape_expr, router_logits.shape_expr, down.shape_expr, int(attr_scalar(top_k, "top_k"))
        )
        constexprs, warps, stages = kernels.aot_config(dims, dtype, gpu.max_shared_bytes)
        return _aot_result(trtp, MOE_KERNEL, gpu.name, dtype, dims, constexprs, warps, stages)
