"""Triton MoE kernels on int4 / fp8 experts (QuantizedExperts) against `ops.moe_reference` on the dequantized weights.

The codes and scales come from the export's own encoder (quant/encode.py `encode_rows`, the DequantizeLinear form of
role `moe_experts`: [E, N, K] blocked along K) and the reference weights from its fake-quant dequantizer
(`dequantized_rows`, the validation reference), which decodes the codes before they are packed: the kernels' nibble
unpacking, fp8 decoding and scale indexing are checked against an independent path. Fused is `moe(...)`; staged runs
the stage entries one launch at a time and checks each stage's output on its own. Negative controls: swapped
nibbles and a scale layout shifted by one block must move the result far outside the tolerance.

Widths are not tile multiples where it matters: I = 96 is padded to 128 by the b128 export (down's K), and the
staged runs use BLOCK_K 64 (two b32 scale blocks per K tile; a b128 block spans two tiles).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does it too)

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("triton", reason="the plugin kernels are Triton kernels")

import triton

from gemma4_compile.errors import Gemma4CompileError
from gemma4_compile.model import ops
from gemma4_compile.plugins.kernels import moe as M
from gemma4_compile.quant.encode import dequantized_rows
from gemma4_compile.quant.formats import GRAPH_DQ

pytestmark = pytest.mark.kernel
DEVICE = "cuda" if os.environ["TRITON_INTERPRET"] == "0" and torch.cuda.is_available() else "cpu"

T, H, E, INTER, TOP_K = 6, 128, 4, 96, 2
# fp32 activations: the kernel's w = q * s is exact in fp32 and the GEMMs are ieee fp32, so it differs from the
# fp32 reference by summation order only (worst seen: 1e-6 on outputs of size ~3). fp16: the table of
# test_kernel_moe.py (x, h and each weighted row rounded once to fp16).
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 3e-3)}
FORMATS = [("int4", 32), ("int4", 128), ("fp8", 128)]
STAGED = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=1)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16"}[dtype]


def dequantized(w: torch.Tensor, fmt: str, block: int, dtype: torch.dtype) -> torch.Tensor:
    """The fake-quant reference weight of experts w [E, N, K]: scales rounded to the export dtype, in fp32."""
    e, n, k = w.shape
    deq = dequantized_rows(fmt, w.reshape(e * n, k).numpy(), block, GRAPH_DQ, _dtype_name(dtype))
    return torch.from_numpy(deq).reshape(e, n, k)


@pytest.fixture(scope="module")
def weights() -> dict:
    g = torch.Generator().manual_seed(0)
    logits = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]).float() / 32  # no top-k ties
    return dict(
        x=torch.randn(T, H, generator=g),
        router_logits=logits,
        per_expert_scale=torch.rand(E, generator=g) + 0.5,
        gate_up=torch.randn(E, 2 * INTER, H, generator=g) * H**-0.5,
        down=torch.randn(E, H, INTER, generator=g) * INTER**-0.5,
    )


def quantized_case(weights: dict, fmt: str, block: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """(kernel inputs with QuantizedExperts, reference inputs in fp32 with the dequantized weights)."""
    kernel = {k: v.to(dtype).to(DEVICE) for k, v in weights.items()}
    ref = {k: v.to(dtype).float() for k, v in weights.items()}
    for name in ("gate_up", "down"):
        kernel[name] = M.QuantizedExperts.encode(weights[name].to(DEVICE), fmt, block, scale_dtype=dtype)
        ref[name] = dequantized(weights[name], fmt, block, dtype)
    return kernel, ref


@pytest.fixture(scope="module", params=FORMATS, ids=[f"{f}_b{b}" for f, b in FORMATS])
def fp32_case(request, weights) -> tuple[str, int, dict, dict]:
    fmt, block = request.param
    return (fmt, block, *quantized_case(weights, fmt, block, torch.float32))


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float().cpu(), want, atol=atol, rtol=rtol)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float().cpu() - want).abs().max() / want.abs().max())


def test_fused_moe_matches_the_reference_on_dequantized_weights(fp32_case, weights):
    _, _, kernel, ref = fp32_case
    want = ops.moe_reference(**ref, top_k=TOP_K)
    assert_close(M.moe(**kernel, top_k=TOP_K), want, torch.float32)
    # the quantization is real: the float weights' result is far outside the tolerance
    assert relative_error(ops.moe_reference(**weights, top_k=TOP_K), want) > 1e-3


def gate_up_reference(x: torch.Tensor, gate_up: torch.Tensor, tokens: torch.Tensor, experts: torch.Tensor):
    """h of each sorted row: gelu_tanh(x[tok] gate[e]^T) * (x[tok] up[e]^T)."""
    w = gate_up[experts]  # [rows, 2I, H]
    gu = torch.einsum("rh,rnh->rn", x[tokens], w)
    return F.gelu(gu[:, :INTER], approximate="tanh") * gu[:, INTER:]


def test_staged_entries_match_the_reference_stage_by_stage(fp32_case):
    _, _, kernel, ref = fp32_case
    x = kernel["x"]
    weights, ids = M.route(kernel["router_logits"], kernel["per_expert_scale"], TOP_K)
    sorted_pairs, pair_rows, expert_offsets, tile_offsets = M.sort_by_expert(ids, E, STAGED.kwargs["BLOCK_M"])
    pairs = sorted_pairs.long().cpu()
    experts = ids.reshape(-1).long().cpu()[pairs]

    h = M.grouped_gate_up(x, kernel["gate_up"], sorted_pairs, expert_offsets, tile_offsets, TOP_K, STAGED)
    assert_close(h, gate_up_reference(ref["x"], ref["gate_up"], pairs // TOP_K, experts), torch.float32)

    rows = M.grouped_down(h, kernel["down"], sorted_pairs, weights, expert_offsets, tile_offsets, STAGED)
    down = torch.einsum("ri,rhi->rh", h.cpu(), ref["down"][experts]) * weights.reshape(-1).cpu()[pairs, None]
    assert_close(rows, down, torch.float32)

    assert_close(M.combine(rows, pair_rows, TOP_K), ops.moe_reference(**ref, top_k=TOP_K), torch.float32)


def test_half_precision_activations_with_half_scales(weights):
    """An fp16 export: scales stored in fp16 (rounded as the reference rounds them), block 64."""
    kernel, ref = quantized_case(weights, "int4", 64, torch.float16)
    assert kernel["gate_up"].scales.dtype == torch.float16
    assert_close(M.moe(**kernel, top_k=TOP_K), ops.moe_reference(**ref, top_k=TOP_K), torch.float16)


# ----- negative controls: a layout mistake must fail the comparison by far ---------------------------------


@pytest.fixture(scope="module")
def int4_b32(weights) -> tuple[dict, dict]:
    return quantized_case(weights, "int4", 32, torch.float32)


def _with(q: M.QuantizedExperts, **changes) -> M.QuantizedExperts:
    return M.QuantizedExperts(**{**vars(q), **changes})


def test_swapped_nibble_order_fails_the_comparison(int4_b32):
    kernel, ref = int4_b32
    q = kernel["gate_up"]
    swapped = ((q.codes & 0x0F) << 4) | (q.codes >> 4)
    assert not torch.equal(swapped, q.codes)
    got = M.moe(**{**kernel, "gate_up": _with(q, codes=swapped)}, top_k=TOP_K)
    assert relative_error(got, ops.moe_reference(**ref, top_k=TOP_K)) > 0.1


def test_scales_shifted_by_one_block_fail_the_comparison(int4_b32):
    kernel, ref = int4_b32
    q = kernel["down"]  # K = INTER = 96: three b32 blocks per row
    got = M.moe(**{**kernel, "down": _with(q, scales=torch.roll(q.scales, 1, dims=-1))}, top_k=TOP_K)
    assert relative_error(got, ops.moe_reference(**ref, top_k=TOP_K)) > 0.1


# ----- bad layouts: one-line errors before any launch -----------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda q: {"format": "int3"}, "format 'int3' is not one of int4, fp8"),
        (lambda q: {"block": 48}, "block 48 is not one of"),
        (lambda q: {"codes": q.codes[:, :, :40]}, "block 32 does not divide its codes' K 80"),
        (lambda q: {"codes": q.codes[:, :, :32]}, r"codes hold \[4, 192, 64\] values, want \[4, 192, 128\]"),
        (lambda q: {"codes": q.codes.view(torch.int8)}, "int4 codes are torch.int8"),
        (lambda q: {"scales": q.scales[:, :, :2]}, r"scales are torch.float32 \(4, 192, 2\), want float"),
    ],
)
def test_bad_layout_is_a_one_line_error(int4_b32, change, match):
    kernel, _ = int4_b32
    q = kernel["gate_up"]
    with pytest.raises(Gemma4CompileError, match=match) as err:
        M.moe(**{**kernel, "gate_up": _with(q, **change(q))}, top_k=TOP_K)
    assert "\n" not in str(err.value)


def test_fp8_codes_must_be_e4m3(weights):
    q = M.QuantizedExperts.encode(weights["down"], "fp8", 32)
    q.check("down", (E, H, INTER))  # the encoder's own layout passes
    with pytest.raises(Gemma4CompileError, match="fp8 codes are torch.uint8"):
        _with(q, codes=q.codes.view(torch.uint8)).check("down", (E, H, INTER))


# ----- GPU code generation: what the interpreter does not exercise -------------------------------------------


# Run in a fresh process: with TRITON_INTERPRET set, this one's kernels are interpreter functions.
_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gemma4_compile.plugins.kernels import moe as M

conf = M.gemm_tile(300, 227 * 1024)  # the prefill tile of a Hopper part
for kernel, weight, fmt, codes in (
    ("_moe_gate_up_kernel", "GateUp_ptr", "int4", "*u8"), ("_moe_down_kernel", "Down_ptr", "fp8", "*fp8e4nv")
):
    fn = getattr(M, kernel)
    constexprs = {**conf.kwargs, "BLOCK_E": 128, "INPUT_PRECISION": "tf32", "WEIGHT_FORMAT": fmt, "QBLOCK": 32}
    if "TOP_K" in fn.arg_names:
        constexprs["TOP_K"] = 8
    ints = ("SortedPairs_ptr", "ExpertOffsets_ptr", "TileOffsets_ptr")
    pointers = {a: "*i32" if a in ints else "*fp32" if a == "Weights_ptr" else "*bf16" for a in fn.arg_names}
    pointers[weight] = codes
    signature = {a: "constexpr" if a in constexprs else pointers[a] if a.endswith("_ptr") else "i32"
                 for a in fn.arg_names}
    options = {"num_warps": conf.num_warps, "num_stages": conf.num_stages}
    out = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                         options=options)
    assert ".target sm_90" in out.asm["ptx"] and len(out.asm["cubin"]) > 0
    print(kernel, fmt, "cubin", len(out.asm["cubin"]))
"""


def test_quantized_gemms_compile_to_a_cubin_for_sm90():
    """Triton lowers the int4 unpacking (bitcast, shifts, interleave) and the E4M3 conversion for a real GPU and
    ptxas accepts the result (no GPU needed): code generation the interpreter never runs."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[2])
    env |= {"TRITON_DEFAULT_FP_FUSION": "1", "PYTHONPATH": os.pathsep.join([root, env.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    compiled = [line.split()[:2] for line in done.stdout.splitlines()]
    assert compiled == [["_moe_gate_up_kernel", "int4"], ["_moe_down_kernel", "fp8"]]
