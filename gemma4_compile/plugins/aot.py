"""Ahead-of-time compilation of the plugin kernels to PTX and cubin for every GPU target, on a machine with no GPU.

An artifact is a pure function of (kernel, dtype, SM, constexprs, num_warps, num_stages, Triton version, PTX
version): `triton.compile(ASTSource(...), target=GPUTarget("cuda", sm, 32))` lowers the kernel to PTX and runs the
`ptxas` that Triton bundles (`triton/backends/nvidia/bin/ptxas` below sm90, `ptxas-blackwell` from sm90 up) to a
cubin. Files are named by the sha256 of that key, so a second `compile_kernels` into the same directory compiles
nothing.

What the compiler tells us on a CPU-only machine: `metadata.shared` (dynamic shared memory to pass at launch),
`metadata.num_warps` and the entry name. `metadata` has no register or spill counts (the driver fills those
in at load time), so we read them from ptxas's own `-v` report (Triton runs ptxas with -v and prints the
report when `knobs.nvidia.dump_ptxas_log` is set): registers, spill stores/loads and stack frame per thread.

Launch contract for a TensorRT QDP `aot_impl` (one kernel per plugin; see `LaunchSpec`): the PTX entry takes
the kernel's non-constexpr arguments in order (input pointers, int32 scalars, output pointers) followed by two
pointers Triton appends itself (global and profile scratch; 0 bytes for these kernels, pass null), block =
(32 * num_warps, 1, 1), dynamic shared memory = `shared_bytes`, grid and scalars from `LaunchSpec`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import BuildError
from ..fsutil import write_atomic
from ..targets import GpuTarget, resolve_target
from .shapes import cdiv

DTYPES = ("bf16", "fp16", "fp32")
RECORD_VERSION = 2  # part of every cache key: bump when KernelEntry's fields change
ALL_TARGETS = ("sm80", "sm86", "sm89", "sm90", "sm100", "sm120")

# PTX is JIT-compiled by the driver that loads it, and a driver rejects a PTX ISA newer than its CUDA version.
# Triton's default is the newest ISA its bundled ptxas knows (8.8 below sm90, 9.4 from sm90 with Triton 3.9,
# i.e. CUDA 13.4 drivers). "oldest" asks for the oldest ISA each architecture accepts: 8.0 (CUDA 12.0) up to
# sm90a, 8.6 (CUDA 12.7) for sm100a, 8.7 (CUDA 12.8) for sm120a; every default variant compiles with it.
OLDEST_PTX = {8: 80, 9: 80, 10: 86, 12: 87}
PtxVersion = int | Literal["oldest", "newest"]


def resolve_ptx_version(ptx_version: PtxVersion, target: GpuTarget) -> int | None:
    """An explicit ISA (e.g. 90 for PTX 9.0), the oldest the target accepts, or None for Triton's newest."""
    if ptx_version == "newest":
        return None
    if ptx_version == "oldest":
        return OLDEST_PTX.get(target.major, 80)
    return int(ptx_version)


# ----- what can be compiled -------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchSpec:
    """How to launch one compiled kernel from shapes alone.

    grid(dims, constexprs) and scalars(dims, constexprs) use only + * // on the dims, with a dim always on the
    left of an int (TensorRT's ShapeExpr * int works, int * ShapeExpr does not), so `dims` may hold ints or
    TensorRT shape expressions. `dims` keys are listed per kernel in `KERNELS[name].dims`; tensors are assumed
    contiguous (their strides follow from the dims).
    """

    grid: Callable[[Mapping[str, Any], Mapping[str, Any]], tuple[Any, Any, Any]]
    scalars: Callable[[Mapping[str, Any], Mapping[str, Any]], list[Any]]


@dataclass(frozen=True)
class KernelSpec:
    name: str
    module: str  # imported lazily, in a process where TRITON_INTERPRET is off
    fn: str
    pointers: Mapping[str, str]  # pointer arg -> element type; "{dtype}" is the variant's dtype
    dims: tuple[str, ...]
    launch: LaunchSpec
    dtype_free: bool = False  # integer-only kernels: compiled once per target, dtype "i32"
    aligned: tuple[str, ...] | None = None  # int args that are multiples of 16 (None: every *stride* arg)
    # pointer args every variant compiles as constexpr None (its config passes None): operands a plugin never
    # has, as the MoE GEMMs' quantized-weight scales (the stage plugins take float experts)
    absent: tuple[str, ...] = ()


def _bhld(B: Any, H: Any, L: Any, D: Any) -> list[Any]:
    """Strides (batch, head, row) of a contiguous [B, H, L, D] tensor."""
    return [H * L * D, L * D, D]


def _attn_fwd_launch() -> LaunchSpec:
    def grid(d: Mapping[str, Any], c: Mapping[str, Any]) -> tuple[Any, Any, Any]:
        positions = c["BLOCK_M"] // d["G"]
        ring = cdiv(d["C"], c["BLOCK_R"]) if c["FUSE_RING"] else 0
        return cdiv(d["S"], positions) + ring, d["B"] * d["Hkv"], 1

    def scalars(d: Mapping[str, Any], c: Mapping[str, Any]) -> list[Any]:
        B, Hq, Hkv, S, C, D = (d[k] for k in ("B", "Hq", "Hkv", "S", "C", "D"))
        new, past, q = _bhld(B, Hkv, S, D), _bhld(B, Hkv, C, D), _bhld(B, Hq, S, D)
        return [*q, *new, *new, *past, *past, *q, *past, *past, S, C, Hkv, d["G"], d["window"]]

    return LaunchSpec(grid, scalars)


def _decode_split_launch() -> LaunchSpec:
    def grid(d: Mapping[str, Any], c: Mapping[str, Any]) -> tuple[Any, Any, Any]:
        return d["splits"], d["B"] * d["Hkv"], 1

    def scalars(d: Mapping[str, Any], c: Mapping[str, Any]) -> list[Any]:
        B, Hq, Hkv, C, D = (d[k] for k in ("B", "Hq", "Hkv", "C", "D"))
        past = _bhld(B, Hkv, C, D)
        q, new = [Hq * D, D], [Hkv * D, D]  # batch and head strides of the one-token q and k/v
        return [*q, *new, *new, *past, *past, C, Hkv, d["G"], d["window"], d["splits"]]

    return LaunchSpec(grid, scalars)


def _decode_combine_launch() -> LaunchSpec:
    return LaunchSpec(
        lambda d, c: (d["B"] * d["Hq"], 1, 1),
        lambda d, c: [d["Hq"] * d["D"], d["D"], d["Hq"], d["splits"]],
    )


def _ring_launch() -> LaunchSpec:
    def grid(d: Mapping[str, Any], c: Mapping[str, Any]) -> tuple[Any, Any, Any]:
        rows = d["C"] if c["COPY_PAST"] else d["S"]
        return cdiv(rows, c["BLOCK_R"]), d["B"] * d["Hkv"], 1

    def scalars(d: Mapping[str, Any], c: Mapping[str, Any]) -> list[Any]:
        B, Hkv, S, C, D = (d[k] for k in ("B", "Hkv", "S", "C", "D"))
        return [*_bhld(B, Hkv, S, D), *_bhld(B, Hkv, C, D), *_bhld(B, Hkv, C, D), S, C, Hkv]

    return LaunchSpec(grid, scalars)


_ATTN = "gemma4_compile.plugins.kernels.attention"
_MOE = "gemma4_compile.plugins.kernels.moe"
_ATTN_PTRS = {
    p: "{dtype}" for p in ("Q_ptr", "K_ptr", "V_ptr", "PK_ptr", "PV_ptr", "O_ptr", "PKO_ptr", "PVO_ptr")
}
_LENS = {"PastLen_ptr": "i64", "SeqLen_ptr": "i64"}

KERNELS: dict[str, KernelSpec] = {}


def _register(spec: KernelSpec) -> None:
    KERNELS[spec.name] = spec


# The fused attention twice: causal (block_ids absent, compiled as constexpr None: the 7-input plugin) and with
# image blocks (`BLK_ptr` = block_ids [B, S] int64 right after seq_len: the 8-input plugin); same grid, scalars.
for _name, _blocks in (("attn_fwd", False), ("attn_fwd_blocks", True)):
    _register(
        KernelSpec(
            _name,
            _ATTN,
            "_attn_fwd_kernel",
            {**_ATTN_PTRS, **_LENS, **({"BLK_ptr": "i64"} if _blocks else {})},
            ("B", "Hq", "Hkv", "G", "S", "C", "D", "window"),
            _attn_fwd_launch(),
            absent=() if _blocks else ("BLK_ptr",),
        )
    )
_register(
    KernelSpec(
        "attn_decode_split",
        _ATTN,
        "_attn_decode_split_kernel",
        {
            **{p: "{dtype}" for p in ("Q_ptr", "K_ptr", "V_ptr", "PK_ptr", "PV_ptr")},
            **_LENS,
            "MidO_ptr": "fp32",
            "MidML_ptr": "fp32",
        },
        ("B", "Hq", "Hkv", "G", "C", "D", "window", "splits"),
        _decode_split_launch(),
    )
)
_register(
    KernelSpec(
        "attn_decode_combine",
        _ATTN,
        "_attn_decode_combine_kernel",
        {"MidO_ptr": "fp32", "MidML_ptr": "fp32", "O_ptr": "{dtype}"},
        ("B", "Hq", "D", "splits"),
        _decode_combine_launch(),
    )
)
_register(
    KernelSpec(
        "ring_update",
        _ATTN,
        "_ring_update_kernel",
        {"New_ptr": "{dtype}", "Past_ptr": "{dtype}", "Out_ptr": "{dtype}", **_LENS},
        ("B", "Hkv", "S", "C", "D"),
        _ring_launch(),
    )
)


def _moe_launches() -> dict[str, tuple[tuple[str, ...], LaunchSpec]]:
    """(dims, launch) per MoE kernel, each from dims its own tensors carry (kernels.moe.launch_dims): T tokens,
    N = T*K routed pairs, NB sort blocks, E experts, H hidden, I expert width."""
    return {
        "moe_route": (
            ("T", "E"),
            LaunchSpec(
                lambda d, c: (cdiv(d["T"], c["BLOCK_T"]), 1, 1), lambda d, c: [d["E"], d["T"], d["E"]]
            ),
        ),
        "moe_count": (("N", "NB"), LaunchSpec(lambda d, c: (d["NB"], 1, 1), lambda d, c: [d["N"]])),
        "moe_offsets": (("NB", "E"), LaunchSpec(lambda d, c: (1, 1, 1), lambda d, c: [d["NB"], d["E"]])),
        "moe_scatter": (("N", "NB"), LaunchSpec(lambda d, c: (d["NB"], 1, 1), lambda d, c: [d["N"]])),
        "moe_gate_up": (
            ("N", "E", "H", "I"),
            LaunchSpec(
                lambda d, c: (cdiv(d["N"], c["BLOCK_M"]) + d["E"], cdiv(d["I"], c["BLOCK_N"]), 1),
                lambda d, c: [d["H"], d["I"] * 2 * d["H"], d["H"], d["I"], d["H"], d["I"], d["E"]],
            ),
        ),
        "moe_down": (
            ("N", "E", "H", "I"),
            LaunchSpec(
                lambda d, c: (cdiv(d["N"], c["BLOCK_M"]) + d["E"], cdiv(d["H"], c["BLOCK_N"]), 1),
                lambda d, c: [d["I"], d["H"] * d["I"], d["I"], d["H"], d["H"], d["I"], d["E"]],
            ),
        ),
        "moe_combine": (
            ("T", "H"),
            LaunchSpec(
                lambda d, c: (d["T"], cdiv(d["H"], c["BLOCK_H"]), 1), lambda d, c: [d["H"], d["H"], d["H"]]
            ),
        ),
    }


_I32 = "i32"
_MOE_L = _moe_launches()
for _name, _fn, _ptrs, _free, _aligned in (
    (
        "moe_route",
        "_moe_route_kernel",
        {"Logits_ptr": "{dtype}", "Scale_ptr": "{dtype}", "Weights_ptr": "fp32", "Ids_ptr": _I32},
        False,
        (),
    ),
    ("moe_count", "_moe_count_kernel", {"Ids_ptr": _I32, "BlockCounts_ptr": _I32}, True, ()),
    (
        "moe_offsets",
        "_moe_offsets_kernel",
        {p: _I32 for p in ("BlockCounts_ptr", "BlockOffsets_ptr", "ExpertOffsets_ptr", "TileOffsets_ptr")},
        True,
        (),
    ),
    (
        "moe_scatter",
        "_moe_scatter_kernel",
        {
            p: _I32
            for p in ("Ids_ptr", "BlockOffsets_ptr", "ExpertOffsets_ptr", "SortedPairs_ptr", "PairRows_ptr")
        },
        True,
        (),
    ),
    (
        "moe_gate_up",
        "_moe_gate_up_kernel",
        {
            "X_ptr": "{dtype}",
            "GateUp_ptr": "{dtype}",
            "H_ptr": "{dtype}",
            **{p: _I32 for p in ("SortedPairs_ptr", "ExpertOffsets_ptr", "TileOffsets_ptr")},
        },
        False,
        ("x_stride_t", "gu_stride_e", "gu_stride_n", "h_stride", "hidden", "inter"),
    ),
    (
        "moe_down",
        "_moe_down_kernel",
        {
            "H_ptr": "{dtype}",
            "Down_ptr": "{dtype}",
            "Out_ptr": "{dtype}",
            "Weights_ptr": "fp32",
            **{p: _I32 for p in ("SortedPairs_ptr", "ExpertOffsets_ptr", "TileOffsets_ptr")},
        },
        False,
        ("h_stride", "dn_stride_e", "dn_stride_n", "out_stride", "hidden", "inter"),
    ),
    (
        "moe_combine",
        "_moe_combine_kernel",
        {"Out_ptr": "{dtype}", "PairRows_ptr": _I32, "Y_ptr": "{dtype}"},
        False,
        ("out_stride", "y_stride", "hidden"),
    ),
):
    _dims, _launch = _MOE_L[_name]
    _absent = {"moe_gate_up": ("GateUpScales_ptr",), "moe_down": ("DownScales_ptr",)}.get(_name, ())
    _register(KernelSpec(_name, _MOE, _fn, _ptrs, _dims, _launch, _free, _aligned, _absent))


@dataclass(frozen=True)
class Launch:
    """Everything a launcher needs besides the tensors: grid, block, dynamic shared memory, int32 scalars."""

    grid: tuple[Any, Any, Any]
    block: tuple[int, int, int]
    shared_bytes: int
    scalars: list[Any]  # in kernel order, between the input and the output pointers


def kernel_io(kernel: str) -> tuple[list[str], list[str], list[str]]:
    """(input pointers, int32 scalars, output pointers) of a kernel, in launch order."""
    import importlib

    spec = KERNELS[kernel]
    fn = getattr(importlib.import_module(spec.module), spec.fn)
    args = [a for a in fn.arg_names if not a.isupper() and a not in spec.absent]  # constexprs are UPPER_CASE
    ptrs = [i for i, a in enumerate(args) if a in spec.pointers]
    first_scalar = next((i for i, a in enumerate(args) if a not in spec.pointers), len(args))
    inputs = [args[i] for i in ptrs if i < first_scalar]
    outputs = [args[i] for i in ptrs if i > first_scalar]
    return inputs, [a for a in args if a not in spec.pointers], outputs


def plan_launch(
    kernel: str, dims: Mapping[str, Any], constexprs: Mapping[str, Any]
) -> tuple[tuple, list[Any]]:
    """(grid, int32 scalars) of a kernel for dims (ints or shape expressions) and its constexprs."""
    spec = KERNELS[kernel]
    missing = [d for d in spec.dims if d not in dims]
    if missing:
        raise BuildError(f"kernel {kernel}: launch needs dims {', '.join(missing)}")
    return spec.launch.grid(dims, constexprs), spec.launch.scalars(dims, constexprs)


def launch_params(entry: KernelEntry, dims: Mapping[str, Any]) -> Launch:
    """Grid, block, shared memory and scalars of a compiled entry for concrete or symbolic dims.

    Example (fused attention of a 26B-A4B sliding layer, 4096-token prefill into a 1024-slot ring):
    `launch_params(e, dict(B=1, Hq=16, Hkv=8, G=2, S=4096, C=1024, D=256, window=1024))`.
    """
    spec = KERNELS[entry.kernel]
    grid, scalars = plan_launch(entry.kernel, dims, entry.constexprs)
    _, names, _ = kernel_io(entry.kernel)
    aligned = spec.aligned if spec.aligned is not None else [n for n in names if "stride" in n]
    for name, value in zip(names, scalars):
        if name in aligned and isinstance(value, int) and value % 16:
            raise BuildError(
                f"kernel {entry.kernel}: {name} = {value} is not a multiple of 16, "
                "which the compiled variant assumes"
            )
    return Launch(grid, (entry.threads, 1, 1), entry.shared_bytes, scalars)


# ----- variants ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One compilation: a kernel, a target, a dtype and every constexpr, plus warps and pipeline stages."""

    kernel: str
    target: str
    dtype: str
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int = 4
    num_stages: int = 2

    @staticmethod
    def make(
        kernel: str,
        target: str,
        dtype: str,
        constexprs: Mapping[str, Any],
        num_warps: int = 4,
        num_stages: int = 2,
    ) -> Variant:
        if kernel not in KERNELS:
            raise BuildError(f"unknown kernel {kernel!r}; known: {', '.join(KERNELS)}")
        if dtype not in DTYPES and not (KERNELS[kernel].dtype_free and dtype == "i32"):
            raise BuildError(f"kernel {kernel}: unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return Variant(
            kernel,
            resolve_target(target).name,
            dtype,
            tuple(sorted(constexprs.items())),
            num_warps,
            num_stages,
        )

    def label(self) -> str:
        c = " ".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{self.kernel} [{self.dtype} {c} warps={self.num_warps} stages={self.num_stages}]"


@dataclass
class KernelEntry:
    """A compiled variant and its resource use (per thread: registers, spills, stack; per block: shared)."""

    kernel: str
    target: str
    dtype: str
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    entry: str  # PTX/cubin entry point name
    ptx: str  # paths relative to out_dir
    cubin: str
    sha256: str  # of the PTX text
    cubin_sha256: str
    registers: int
    shared_bytes: int  # dynamic shared memory to pass at launch
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    threads: int
    ptx_version: str
    params: list[str]  # PTX entry parameters in order (kernel args, then Triton's scratch pointers)
    key: str
    scratch_bytes: int = (
        0  # global + profile scratch Triton wants behind its two extra pointers (0: pass null)
    )

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


@dataclass
class KernelArtifacts:
    out_dir: Path
    entries: list[KernelEntry] = field(default_factory=list)

    @property
    def table_path(self) -> Path:
        return self.out_dir / "kernels.json"

    def find(self, kernel: str, target: str, dtype: str, **constexprs: Any) -> list[KernelEntry]:
        """Entries of a kernel for a target and dtype whose constexprs include the given ones (tactics)."""
        t = resolve_target(target).name
        return [
            e
            for e in self.entries
            if e.kernel == kernel
            and e.target == t
            and e.dtype == dtype
            and all(e.constexprs.get(k) == v for k, v in constexprs.items())
        ]


def default_variants(target: GpuTarget, dtype: str, head_dims: Sequence[int] = (256, 512)) -> list[Variant]:
    """Every variant the plugins launch on one target: attention per head_dim, ring, decode and MoE."""
    from .kernels.configs import attention_variants, moe_variants

    out = [
        Variant.make(k, target.name, d, c, w, s)
        for k, d, c, w, s in attention_variants(target, dtype, head_dims)
    ]
    return out + [Variant.make(k, target.name, d, c, w, s) for k, d, c, w, s in moe_variants(target, dtype)]


# ----- compilation -----------------------------------------------------------------------------------

_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def parse_ptxas_log(log: str) -> dict[str, int]:
    """Registers, stack frame and spill bytes from a `ptxas -v` report (0 when a line is absent)."""
    out = {}
    for name, rx in _PTXAS_RE.items():
        m = rx.findall(log)
        out[name] = max(int(x) for x in m) if m else 0
    return out


def _signature(fn: Any, spec: KernelSpec, dtype: str, constexprs: Mapping[str, Any]) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in spec.pointers:
            sig[name] = "*" + spec.pointers[name].format(dtype=dtype)
        else:
            sig[name] = "i32"
    return sig


def _divisibility(fn: Any, spec: KernelSpec) -> dict[tuple[int, ...], list[list[Any]]]:
    """Pointers are 16-byte aligned (TensorRT and PyTorch allocations); strides are multiples of 16 elements
    (every head_dim, hidden and expert width of Gemma 4 is), which lets Triton vectorize row loads.
    `launch_check` enforces the stride half of this at build time."""
    aligned = spec.aligned if spec.aligned is not None else [a for a in fn.arg_names if "stride" in a]
    return {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if name in spec.pointers or name in aligned
    }


def variant_key(v: Variant, ptx_version: int | None) -> str:
    """sha256 over everything the artifact depends on, kernel source included."""
    import importlib

    import triton

    spec = KERNELS[v.kernel]
    fn = getattr(importlib.import_module(spec.module), spec.fn)
    blob = json.dumps(
        [
            RECORD_VERSION,
            v.kernel,
            fn.cache_key,
            v.dtype,
            v.target,
            list(v.constexprs),
            v.num_warps,
            v.num_stages,
            triton.__version__,
            ptx_version,
        ],
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _compile_one(v: Variant, out_dir: str, ptx_version: int | None) -> dict[str, Any]:
    """Compile one variant (or reuse its files) and return its KernelEntry as a dict. Runs in a worker."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = KERNELS[v.kernel]
    target = resolve_target(v.target)
    key = variant_key(v, ptx_version)
    stem = Path(out_dir) / v.target / f"{v.kernel}-{v.dtype}-{key[:16]}"
    if (
        stem.with_suffix(".json").exists()
        and stem.with_suffix(".ptx").exists()
        and stem.with_suffix(".cubin").exists()
    ):
        return json.loads(stem.with_suffix(".json").read_text())
    fn = getattr(importlib.import_module(spec.module), spec.fn)
    constexprs = dict(v.constexprs)
    src = ASTSource(
        fn, _signature(fn, spec, v.dtype, constexprs), constexprs=constexprs, attrs=_divisibility(fn, spec)
    )
    options: dict[str, Any] = {"num_warps": v.num_warps, "num_stages": v.num_stages}
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a Triton cache hit skips ptxas and so its -v report
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", target.sm, 32), options=options)
    except Exception as e:  # a Triton or ptxas failure: name the variant and the innermost cause, on one line
        raise BuildError(f"{v.label()} on {v.target}: compilation failed: {_root_message(e)}") from None
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    res = parse_ptxas_log(log.getvalue())
    header = re.search(r"\.version (\S+)", ptx)
    entry = re.search(r"\.visible\s+\.entry\s+(\w+)\s*\(([^)]*)\)", ptx)
    n_params = len(re.findall(r"\.param\s", entry.group(2))) if entry else 0
    args = [a for a in fn.arg_names if a not in constexprs]
    params = args + [f"triton_scratch_{i}" for i in range(n_params - len(args))]
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(stem.with_suffix(".ptx"), ptx.encode())
    write_atomic(stem.with_suffix(".cubin"), cubin)
    rec = KernelEntry(
        kernel=v.kernel,
        target=v.target,
        dtype=v.dtype,
        constexprs=constexprs,
        num_warps=v.num_warps,
        num_stages=v.num_stages,
        entry=compiled.metadata.name,
        ptx=str(stem.with_suffix(".ptx").relative_to(out_dir)),
        cubin=str(stem.with_suffix(".cubin").relative_to(out_dir)),
        sha256=hashlib.sha256(ptx.encode()).hexdigest(),
        cubin_sha256=hashlib.sha256(cubin).hexdigest(),
        registers=res["registers"],
        shared_bytes=int(compiled.metadata.shared),
        spill_stores=res["spill_stores"],
        spill_loads=res["spill_loads"],
        stack_bytes=res["stack_bytes"],
        threads=32 * v.num_warps,
        ptx_version=header.group(1) if header else "?",
        params=params,
        key=key,
        scratch_bytes=_scratch_bytes(compiled.metadata),
    )
    record = asdict(rec)
    write_atomic(stem.with_suffix(".json"), json.dumps(record, indent=1, default=str).encode())
    return record


_ENTRY_RE = re.compile(r"(\.visible\s+\.entry\s+\w+\s*\()([^)]*)(\))")


def aot_launchable_ptx(ptx: str, entry: KernelEntry) -> str:
    """The PTX with Triton's trailing scratch-pointer parameters removed from the entry, so that its parameters
    are exactly what a TensorRT AOT plugin launch passes (inputs, int32 scalars, outputs).

    Triton declares two scratch pointers on every entry even when the kernel needs no scratch memory, and then
    never reads them; a parameter the body references cannot be dropped, and that is a BuildError.
    """
    match = _ENTRY_RE.search(ptx)
    if match is None:
        raise BuildError(f"{entry.kernel}: no .entry in its PTX")
    decls = [d.strip() for d in match.group(2).split(",") if d.strip()]
    n_scratch = sum(p.startswith("triton_scratch_") for p in entry.params)
    if len(decls) != len(entry.params):
        raise BuildError(
            f"{entry.kernel}: PTX entry has {len(decls)} parameters, the record {len(entry.params)}"
        )
    keep, drop = decls[: len(decls) - n_scratch], decls[len(decls) - n_scratch :]
    body = ptx[match.end() :]
    used = [d.split()[-1] for d in drop if re.search(rf"\b{re.escape(d.split()[-1])}\b", body)]
    if used:
        raise BuildError(
            f"{entry.kernel}: uses Triton scratch memory ({entry.scratch_bytes} bytes, parameters "
            f"{', '.join(used)}), which a TensorRT AOT plugin launch cannot pass"
        )
    params = ",\n".join(f"\t{d}" for d in keep)
    return ptx[: match.start(2)] + f"\n{params}\n" + ptx[match.end(2) :]


def _scratch_bytes(metadata: Any) -> int:
    return sum(int(getattr(metadata, f, 0) or 0) for f in ("global_scratch_size", "profile_scratch_size"))


def _root_message(e: BaseException) -> str:
    """The innermost cause of a compile error: Triton wraps each frame of a failing jit call in its own
    CompilationError, whose `error_message` carries the actual reason; ptxas errors keep it in the text."""
    while e.__cause__ is not None:
        e = e.__cause__
    message = getattr(e, "error_message", None)
    if message:
        return str(message).strip().splitlines()[0]
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else type(e).__name__)


def _check_shared(rec: KernelEntry, v: Variant) -> None:
    limit = resolve_target(v.target).max_shared_bytes
    if rec.shared_bytes > limit:
        raise BuildError(
            f"{v.label()} needs {rec.shared_bytes} bytes of shared memory on {v.target}, "
            f"which allows {limit} per block; pick a smaller block config"
        )


def compile_variants(
    out_dir: str | os.PathLike[str],
    variants: Iterable[Variant],
    *,
    jobs: int | None = None,
    ptx_version: PtxVersion = "oldest",
) -> list[KernelEntry]:
    """Compile variants (or reuse their files) and check each one's shared memory against its target.

    The work runs in `jobs` child processes (`python -m gemma4_compile.plugins.aot`): there the kernels are
    imported fresh with TRITON_INTERPRET unset, so they are real JIT functions even when this process uses
    the CPU interpreter, and no caller needs multiprocessing's `if __name__ == "__main__"` guard.
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    todo = list(dict.fromkeys(variants))
    if not todo:
        return []
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    records: list[dict[str, Any] | None] = [None] * len(todo)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="gemma4-aot-") as tmp:
        workers = []
        try:
            for j in range(jobs):
                idx = list(range(j, len(todo), jobs))
                request = {
                    "out_dir": str(out),
                    "result": f"{tmp}/{j}.out.json",
                    "variants": [asdict(todo[i]) for i in idx],
                    "ptx_versions": [
                        resolve_ptx_version(ptx_version, resolve_target(todo[i].target)) for i in idx
                    ],
                }
                Path(f"{tmp}/{j}.in.json").write_text(json.dumps(request, default=str))
                with open(f"{tmp}/{j}.err", "w") as err:  # a file, not a pipe: a chatty child never blocks
                    proc = subprocess.Popen(
                        [sys.executable, "-m", __name__, f"{tmp}/{j}.in.json"],
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                    )
                workers.append((proc, idx, Path(request["result"]), Path(f"{tmp}/{j}.err")))
            for proc, idx, result, err_path in workers:
                if proc.wait() != 0 or not result.exists():
                    lines = err_path.read_text().strip().splitlines()
                    raise BuildError(
                        f"kernel compiler process failed: {lines[-1] if lines else proc.returncode}"
                    )
                for i, rec in zip(idx, json.loads(result.read_text())):
                    if "error" in rec:
                        raise BuildError(rec["error"])
                    records[i] = rec
        finally:
            for proc, *_ in workers:  # on an error, stop the other workers before their folder goes away
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    entries = [KernelEntry(**r) for r in records if r is not None]
    for rec, v in zip(entries, todo):
        _check_shared(rec, v)
    return entries


def _worker_main(request_path: str) -> None:
    """Child side of `compile_variants`: a request file in, one record (or error line) per variant out."""
    request = json.loads(Path(request_path).read_text())
    out = []
    for v, ptx_version in zip(request["variants"], request["ptx_versions"]):
        variant = Variant(
            v["kernel"],
            v["target"],
            v["dtype"],
            tuple(tuple(c) for c in v["constexprs"]),
            v["num_warps"],
            v["num_stages"],
        )
        try:
            out.append(_compile_one(variant, request["out_dir"], ptx_version))
        except BuildError as e:
            out.append({"error": str(e)})
    write_atomic(Path(request["result"]), json.dumps(out, default=str).encode())


def compile_kernels(
    out_dir: str | os.PathLike[str],
    targets: list[str],
    dtypes: Sequence[str] = ("bf16", "fp16"),
    *,
    head_dims: Sequence[int] = (256, 512),
    jobs: int | None = None,
    ptx_version: PtxVersion = "oldest",
) -> KernelArtifacts:
    """Compile every kernel variant for each target and dtype; write the resource table `out_dir/kernels.json`."""
    resolved = [resolve_target(t) for t in targets]
    for d in dtypes:
        if d not in DTYPES:
            raise BuildError(f"unknown kernel dtype {d!r}; choose from {', '.join(DTYPES)}")
    variants = [v for t in resolved for d in dtypes for v in default_variants(t, d, head_dims)]
    entries = compile_variants(out_dir, variants, jobs=jobs, ptx_version=ptx_version)
    arts = KernelArtifacts(Path(out_dir).resolve(), entries)
    write_table(arts)
    return arts


def write_table(arts: KernelArtifacts) -> Path:
    """Write kernels.json atomically (temp file, then rename), so readers never see half a table."""
    import triton

    doc = {"triton": triton.__version__, "kernels": [asdict(e) for e in arts.entries]}
    write_atomic(arts.table_path, json.dumps(doc, indent=1, default=str).encode())
    return arts.table_path


def load_table(out_dir: str | os.PathLike[str]) -> KernelArtifacts:
    path = Path(out_dir) / "kernels.json"
    doc = json.loads(path.read_text())
    return KernelArtifacts(Path(out_dir).resolve(), [KernelEntry(**e) for e in doc["kernels"]])


def kernel_table_markdown(artifacts: KernelArtifacts) -> str:
    """One row per compiled variant: registers, shared memory and spills, for the CLI to print."""
    rows = [
        "| kernel | target | dtype | config | warps | regs | shared (B) | spill st/ld (B) | stack (B) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in sorted(
        artifacts.entries, key=lambda e: (e.kernel, e.target, e.dtype, sorted(e.constexprs.items()))
    ):
        conf = " ".join(f"{k}={v}" for k, v in sorted(e.constexprs.items()) if k.isupper())
        rows.append(
            f"| {e.kernel} | {e.target} | {e.dtype} | {conf} | {e.num_warps} | {e.registers} | "
            f"{e.shared_bytes} | {e.spill_stores}/{e.spill_loads} | {e.stack_bytes} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    _worker_main(sys.argv[1])
