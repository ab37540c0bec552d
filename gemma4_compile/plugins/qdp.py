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
and stays with the Python plugin); a node with block_ids (26B/31B exports with images) is its own plugin,
`gemma4::SlidingWindowAttentionBlocks` on `attn_fwd_blocks`, because a QDP's signature fixes its inputs (the
engine builder renames those nodes: passes/block_attention.py). Kernels come from `aot.compile_variants` (cached by content under
AOT_CACHE) and launch by `aot.KERNELS[name].launch`, whose arithmetic runs on TensorRT shape expressions:
every tensor dim is passed as a ShapeExpr (ShapeExpr * int works, int * ShapeExpr does not), only the
GQA group and the window as ints. The MoE takes seven launches, so it is seven plugins, one per stage of
moe_stages.py (the engine builder splits the fused node when they are registered); their functions are
generated from the kernels' signatures, with `__signature__` set for QDP's `inspect.signature` parsing.
The fused `gemma4::MoE` gets no QDP: an unsplit graph inlines its function body instead.

Triton appends two scratch-pointer parameters to every PTX entry, which TensorRT's AOT launch (input
pointers, int32 scalars, output pointers) does not pass; our kernels never read them, so `compile_kernel`
hands TensorRT the PTX with them removed (aot.aot_launchable_ptx; ptxas accepts the result).

No `from __future__ import annotations` here: QDP inspects the annotations as classes.
"""

import importlib
import inspect
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import ops
from ..dtypes import FLOAT_CHOICES, DType
from ..errors import BackendUnavailable
from ..ops.attention import SLIDING_WINDOW_ATTENTION as ATTENTION
from ..ops.attention import SLIDING_WINDOW_ATTENTION_BLOCKS as ATTENTION_BLOCKS
from ..ops.contract import OpContract, PluginError
from ..targets import GpuTarget, resolve_target
from . import moe_stages as ms
from .moe_stages import STAGES, Stage

QDP_UNAVAILABLE = "needs full TensorRT (tensorrt.plugin), not installable from PyPI"
KERNEL_TRT_TYPES = tuple(DType.parse(d).trt_name for d in FLOAT_CHOICES)  # "FLOAT", "HALF", "BF16"
ACTIVATION_TYPES = ("FP32", "FP16", "BF16")  # AutoTuneCombination names; '|' ties them across positions
ATTENTION_KERNEL = ops.entry(ATTENTION.op_type).aot_kernel
AOT_CACHE = Path(tempfile.gettempdir()) / "gemma4_compile_aot"


# ----- pure parts (CPU-tested) ------------------------------------------------------------------


def autotune_types(spec: OpContract, activation: Sequence[str] = ACTIVATION_TYPES) -> str:
    """`AutoTuneCombination` type string: activations share one dtype ('|' is dependent), lengths INT64."""
    tied = "|".join(activation)
    return ", ".join("INT64" if spec.is_int64(pos) else tied for pos in range(spec.num_io()))


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


def triton_dtype(type_name: str) -> str:
    """trt.DataType name -> the aot.py dtype of the kernels ("fp32" | "fp16" | "bf16")."""
    if type_name not in KERNEL_TRT_TYPES:
        raise PluginError(f"no gemma4 kernel for dtype {type_name}; supported: {sorted(KERNEL_TRT_TYPES)}")
    return DType.parse(type_name).value


def attention_config(
    head_dim: int, group: int, dtype: str, scale: float, target: GpuTarget, blocks: bool = False,
    sliding: bool = True,
) -> tuple[dict[str, Any], int, int]:  # fmt: skip
    """(constexprs, num_warps, num_stages) of the fused attention launch for one layer on one target: the
    variant `gemma4-compile kernels` compiles for that target (kernels.configs, the one tile chooser).
    `blocks`: the 8-input form (`attention_kernel`), whose block_ids only a `sliding` layer reads."""
    from .kernels.configs import attention_fwd_variant

    _, _, constexprs, warps, stages = attention_fwd_variant(
        target, dtype, head_dim, group, scale, blocks, sliding
    )
    return constexprs, warps, stages


def attention_kernel(blocks: bool) -> str:
    """aot.py's fused attention for a node without (7 inputs) or with (8) block_ids: the launch order is the
    node's inputs, so the 8-input kernel takes BLK_ptr right after seq_len."""
    return "attn_fwd_blocks" if blocks else ATTENTION_KERNEL


def attention_variant(
    target: GpuTarget, dtype: str, head_dim: int, group: int, scale: float, blocks: bool = False,
    sliding: bool = True,
) -> Any:  # fmt: skip
    """The aot.Variant the attention QDP compiles for a layer on `target`."""
    from . import aot

    constexprs, warps, stages = attention_config(head_dim, group, dtype, scale, target, blocks, sliding)
    return aot.Variant.make(attention_kernel(blocks), target.name, dtype, constexprs, warps, stages)


def stage_variant(stage: Stage, fields: Mapping[str, int], dtype: str, target: GpuTarget) -> Any:
    """The aot.Variant a MoE stage QDP compiles for its fields on `target`."""
    from . import aot

    kdtype, constexprs, warps, stages = ms.stage_config(stage, fields, dtype, target)
    return aot.Variant.make(stage.kernel, target.name, kdtype, constexprs, warps, stages)


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
    kernel: str,
    target: str,
    dtype: str,
    constexprs: Mapping[str, Any],
    num_warps: int,
    num_stages: int,
    cache_dir: Path | None = None,
) -> tuple[Any, str]:
    """(aot.KernelEntry, PTX a TensorRT AOT launch can take) for one variant, compiled once into `cache_dir`
    (default AOT_CACHE); a `gemma4-compile kernels` output directory makes its variants cache hits."""
    from . import aot

    cache = Path(cache_dir) if cache_dir is not None else AOT_CACHE
    variant = aot.Variant.make(kernel, target, dtype, constexprs, num_warps, num_stages)
    (entry,) = aot.compile_variants(cache, [variant], jobs=1)
    return entry, aot.aot_launchable_ptx((cache / entry.ptx).read_text(), entry)


# ----- registration (needs tensorrt.plugin) -----------------------------------------------------


def qdp_module(trt: ModuleType) -> ModuleType:
    """`<trt>.plugin`, or BackendUnavailable saying why there is none."""
    try:
        return importlib.import_module(f"{trt.__name__}.plugin")
    except ImportError as exc:
        raise BackendUnavailable(f"gemma4 QDP plugins {QDP_UNAVAILABLE} ({exc})") from exc


def is_registered(trtp: ModuleType, spec: OpContract | Stage) -> bool:
    namespace = getattr(trtp.op, spec.plugin_id.split("::")[0], None)
    return namespace is not None and hasattr(namespace, spec.op_type)


def plugin_ids() -> list[str]:
    """What `register_qdp` defines: every op the registry gives a QDP (attention without and with block_ids,
    and the seven MoE stages)."""
    return [e.contract.plugin_id for e in ops.with_plugin("qdp")]


def register_qdp(trt: ModuleType, target: str = "native", cache_dir: Path | None = None) -> list[str]:
    """Define the `gemma4` QDPs in `trt.plugin` (idempotent: QDP forbids defining a name twice).

    `target` (a targets name; "native" = this machine's GPU) is what the AOT kernels are
    compiled for, resolved when TensorRT asks for them during the build; `cache_dir` is where they are
    compiled (a `gemma4-compile kernels -o DIR` directory reuses what it holds; default AOT_CACHE).
    """
    trtp = qdp_module(trt)
    if not is_registered(trtp, ATTENTION):
        _define_attention(trtp, target, cache_dir)
    if not is_registered(trtp, ATTENTION_BLOCKS):
        _define_attention_blocks(trtp, target, cache_dir)
    for stage in STAGES:
        if not is_registered(trtp, stage):
            _define_moe_stage(trtp, trt, target, cache_dir, stage)
    return plugin_ids()


def _aot_result(trtp: ModuleType, variant: Any, dims: Mapping[str, Any], cache_dir: Path | None) -> tuple:
    """Compile and describe one launch: the (name, PTX, KernelLaunchParams, SymIntExprs) aot_impl returns."""
    constexprs = dict(variant.constexprs)
    entry, ptx = compile_kernel(
        variant.kernel,
        variant.target,
        variant.dtype,
        constexprs,
        variant.num_warps,
        variant.num_stages,
        cache_dir,
    )
    grid, scalars = launch_values(variant.kernel, dims, constexprs)
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = grid
    params.block_x = entry.threads
    params.shared_mem = entry.shared_bytes
    return entry.entry, ptx, params, trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in scalars])


def _attention_result(
    trtp: ModuleType, q: Any, k: Any, past_k: Any, window: Any, scale: Any, aot: tuple, blocks: bool
) -> tuple:
    """aot_impl of either attention QDP (`aot`: the target and kernel cache they were registered with);
    `blocks`: the 8-input kernel, whose block ids only a sliding layer (window > 0) reads."""
    target, cache_dir = aot
    window = int(attr_scalar(window, "window"))
    dims = attention_dims(q.shape_expr, k.shape_expr, past_k.shape_expr, window)
    head_dim = static(dims["D"], "head dim D")
    variant = attention_variant(
        resolve_target(target),
        triton_dtype(q.dtype.name),
        head_dim,
        dims["G"],
        float(attr_scalar(scale, "scale")),
        blocks,
        sliding=window > 0,
    )
    return _aot_result(trtp, variant, dims, cache_dir)


def _define_attention(trtp: ModuleType, target: str, cache_dir: Path | None) -> None:
    TensorDesc = trtp.TensorDesc  # a class: the annotations below must be real classes

    @trtp.register(ATTENTION.plugin_id)
    def attention_desc(
        q: TensorDesc,
        k: TensorDesc,
        v: TensorDesc,
        past_k: TensorDesc,
        past_v: TensorDesc,
        past_len: TensorDesc,
        seq_len: TensorDesc,
        window: npt.NDArray[np.int32],
        scale: npt.NDArray[np.float32],
    ) -> tuple[TensorDesc, TensorDesc, TensorDesc]:
        return q.like(), past_k.like(), past_v.like()  # = ATTENTION.output_like

    @trtp.autotune(ATTENTION.plugin_id)
    def attention_autotune(
        q, k, v, past_k, past_v, past_len, seq_len, outputs
    ) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(autotune_types(ATTENTION))]

    @trtp.aot_impl(ATTENTION.plugin_id)
    def attention_aot(
        q: TensorDesc,
        k: TensorDesc,
        v: TensorDesc,
        past_k: TensorDesc,
        past_v: TensorDesc,
        past_len: TensorDesc,
        seq_len: TensorDesc,
        window: npt.NDArray[np.int32],
        scale: npt.NDArray[np.float32],
        outputs: tuple[TensorDesc, TensorDesc, TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        return _attention_result(trtp, q, k, past_k, window, scale, (target, cache_dir), blocks=False)


def _define_attention_blocks(trtp: ModuleType, target: str, cache_dir: Path | None) -> None:
    """The 8-input attention (block_ids after seq_len): the nodes passes/block_attention.py renames."""
    TensorDesc = trtp.TensorDesc

    @trtp.register(ATTENTION_BLOCKS.plugin_id)
    def attention_blocks_desc(
        q: TensorDesc,
        k: TensorDesc,
        v: TensorDesc,
        past_k: TensorDesc,
        past_v: TensorDesc,
        past_len: TensorDesc,
        seq_len: TensorDesc,
        block_ids: TensorDesc,
        window: npt.NDArray[np.int32],
        scale: npt.NDArray[np.float32],
    ) -> tuple[TensorDesc, TensorDesc, TensorDesc]:
        return q.like(), past_k.like(), past_v.like()  # = ATTENTION_BLOCKS.output_like

    @trtp.autotune(ATTENTION_BLOCKS.plugin_id)
    def attention_blocks_autotune(
        q, k, v, past_k, past_v, past_len, seq_len, block_ids, outputs
    ) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(autotune_types(ATTENTION_BLOCKS))]

    @trtp.aot_impl(ATTENTION_BLOCKS.plugin_id)
    def attention_blocks_aot(
        q: TensorDesc,
        k: TensorDesc,
        v: TensorDesc,
        past_k: TensorDesc,
        past_v: TensorDesc,
        past_len: TensorDesc,
        seq_len: TensorDesc,
        block_ids: TensorDesc,
        window: npt.NDArray[np.int32],
        scale: npt.NDArray[np.float32],
        outputs: tuple[TensorDesc, TensorDesc, TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        return _attention_result(trtp, q, k, past_k, window, scale, (target, cache_dir), blocks=True)


def _stage_signature(trtp: ModuleType, stage: Stage, kind: str) -> inspect.Signature:
    """The signature QDP reads (inspect.signature) for one stage: tensors, int32 fields, then per `kind`:
    register -> returns the outputs; autotune -> (tensors, outputs); aot_impl -> (..., outputs, tactic)."""
    P = inspect.Parameter
    inputs, outputs = ms.stage_io(stage)
    tensors = [P(ms.arg_name(p), P.POSITIONAL_OR_KEYWORD, annotation=trtp.TensorDesc) for p in inputs]
    fields = [
        P(f.name, P.POSITIONAL_OR_KEYWORD, annotation=npt.NDArray[getattr(np, f.dtype)])
        for f in stage.contract.fields
    ]
    out_tuple = tuple[tuple([trtp.TensorDesc] * len(outputs))]  # type: ignore[misc]
    if kind == "register":
        returns = trtp.TensorDesc if len(outputs) == 1 else out_tuple
        return inspect.Signature([*tensors, *fields], return_annotation=returns)
    if kind == "autotune":
        return inspect.Signature(
            [*tensors, P("outputs", P.POSITIONAL_OR_KEYWORD)],
            return_annotation=list[trtp.AutoTuneCombination],
        )
    return inspect.Signature(
        [
            *tensors,
            *fields,
            P("outputs", P.POSITIONAL_OR_KEYWORD, annotation=out_tuple),
            P("tactic", P.POSITIONAL_OR_KEYWORD, annotation=int),
        ],
        return_annotation=tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs],
    )


def _with_signature(fn: Callable[..., Any], signature: inspect.Signature, name: str) -> Callable[..., Any]:
    fn.__signature__ = signature  # type: ignore[attr-defined]
    fn.__name__ = fn.__qualname__ = name
    return fn


def stage_type_string(stage: Stage, activation: Sequence[str] = ACTIVATION_TYPES) -> str:
    """`AutoTuneCombination` types of a stage: activations tied, fp32 routing weights, int32 ids and offsets."""
    inputs, outputs = ms.stage_io(stage)
    names = {"act": "|".join(activation), "f32": "FP32", "i32": "INT32"}
    return ", ".join(names[ms.pointer_kind(stage, p)] for p in (*inputs, *outputs))


def _bound(
    stage: Stage, signature: inspect.Signature, args: tuple, kwargs: dict
) -> tuple[dict[str, Any], dict[str, int], dict[str, Any]]:
    """Call arguments -> ({pointer: TensorDesc}, {field: int}, the stage's dims from its input shapes)."""
    values = signature.bind(*args, **kwargs).arguments
    descs = {p: values[ms.arg_name(p)] for p in ms.stage_io(stage)[0]}
    fields = {f: int(attr_scalar(values[f], f)) for f in stage.contract.field_names}
    return descs, fields, ms.stage_dims({p: d.shape_expr for p, d in descs.items()}, fields)


def _define_moe_stage(
    trtp: ModuleType, trt: ModuleType, target: str, cache_dir: Path | None, stage: Stage
) -> None:
    inputs, _ = ms.stage_io(stage)
    trt_types = {"f32": trt.float32, "i32": trt.int32}
    signatures = {kind: _stage_signature(trtp, stage, kind) for kind in ("register", "autotune", "aot_impl")}
    activation = next((p for p in inputs if ms.pointer_kind(stage, p) == "act"), None)

    def describe(*args, **kwargs):
        descs, _, dims = _bound(stage, signatures["register"], args, kwargs)
        out = [
            trtp.from_shape_expr(
                tuple(shape), dtype=descs[activation].dtype if kind == "act" else trt_types[kind]
            )
            for shape, kind in ms.stage_outputs(stage, dims)
        ]
        return out[0] if len(out) == 1 else tuple(out)

    def autotune(*args, **kwargs):
        return [trtp.AutoTuneCombination(stage_type_string(stage))]

    def aot(*args, **kwargs):
        descs, fields, dims = _bound(stage, signatures["aot_impl"], args, kwargs)
        dtype = triton_dtype(descs[activation].dtype.name) if activation else "fp32"
        return _aot_result(trtp, stage_variant(stage, fields, dtype, resolve_target(target)), dims, cache_dir)

    name = stage.op_type
    trtp.register(stage.plugin_id)(_with_signature(describe, signatures["register"], f"{name}_desc"))
    trtp.autotune(stage.plugin_id)(_with_signature(autotune, signatures["autotune"], f"{name}_autotune"))
    trtp.aot_impl(stage.plugin_id)(_with_signature(aot, signatures["aot_impl"], f"{name}_aot"))
