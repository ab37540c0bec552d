"""Ahead-of-time kernel compilation on a CPU-only machine: PTX + cubin per target, the resource table, the cache,
the shared-memory check, and the launch contract a TensorRT AOT plugin relies on (run here on the interpreter).
"""

from __future__ import annotations

import json
import os
import re
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # the launch-contract tests run kernels on the interpreter

import pytest
import torch

pytest.importorskip("triton", reason="the plugin kernels are Triton kernels")

from gemma4_compile.errors import BuildError
from gemma4_compile.model import ops
from gemma4_compile.plugins import aot
from gemma4_compile.plugins.kernels import attention as A
from gemma4_compile.plugins.kernels import moe as M
from gemma4_compile.targets import resolve_target

pytestmark = pytest.mark.kernel
PTX_TARGET = {
    "sm80": "sm_80",
    "sm86": "sm_86",
    "sm89": "sm_89",
    "sm90": "sm_90a",
    "sm100": "sm_100a",
    "sm120": "sm_120a",
}


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels")
    start = time.perf_counter()
    arts = aot.compile_kernels(out, ["h200"], dtypes=("bf16",), head_dims=(256,), jobs=2)
    return arts, time.perf_counter() - start


def test_kernel_aot_compiles_every_kernel_for_a_target(sm90):
    arts, _ = sm90
    assert {e.kernel for e in arts.entries} == set(aot.KERNELS)
    table = json.loads(arts.table_path.read_text())
    assert [e["key"] for e in table["kernels"]] == [e.key for e in arts.entries]
    for e in arts.entries:
        ptx = (arts.out_dir / e.ptx).read_text()
        cubin = (arts.out_dir / e.cubin).read_bytes()
        assert f".target {PTX_TARGET['sm90']}" in ptx and f".entry {e.entry}(" in ptx
        assert cubin[:4] == b"\x7fELF" and aot.hashlib.sha256(cubin).hexdigest() == e.cubin_sha256
        assert aot.hashlib.sha256(ptx.encode()).hexdigest() == e.sha256
        assert e.target == "sm90" and e.threads == 32 * e.num_warps
        assert 0 < e.registers <= 255 and e.spills == 0, f"{e.kernel} spills {e.spills} B"
        assert e.shared_bytes <= resolve_target("sm90").max_shared_bytes
        inputs, scalars, outputs = aot.kernel_io(e.kernel)
        assert e.params == [*inputs, *scalars, *outputs, "triton_scratch_0", "triton_scratch_1"]
        assert e.scratch_bytes == 0  # so a launcher may pass null for Triton's two scratch pointers
        launchable = aot.aot_launchable_ptx(ptx, e)  # ... or, as TensorRT's AOT launch does, not pass them
        declared = re.search(r"\.entry \w+\(([^)]*)\)", launchable).group(1)
        assert declared.count(".param") == len(inputs) + len(scalars) + len(outputs)
    assert not list(arts.out_dir.rglob("*.tmp")), "a temp file survived an atomic write"
    md = aot.kernel_table_markdown(arts)
    assert md.count("\n") == len(arts.entries) + 1 and "| attn_fwd | sm90 | bf16 |" in md


def test_kernel_aot_second_compile_is_a_cache_hit(sm90):
    arts, _ = sm90
    stamps = {e.ptx: (arts.out_dir / e.ptx).stat().st_mtime_ns for e in arts.entries}
    again = aot.compile_kernels(arts.out_dir, ["sm90"], dtypes=("bf16",), head_dims=(256,), jobs=2)
    assert [e.key for e in again.entries] == [e.key for e in arts.entries]
    assert stamps == {e.ptx: (arts.out_dir / e.ptx).stat().st_mtime_ns for e in again.entries}


def test_kernel_aot_full_tensorrt_plugins_reuse_the_kernels_output(sm90):
    """`build` with full TensorRT compiles through qdp.compile_kernel into the export's kernels directory: the
    MoE stages of a 128-expert top-8 layer at decode and prefill batch sizes are the variants already there."""
    from gemma4_compile.plugins import moe_stages, qdp

    arts, _ = sm90
    keys = {e.key for e in arts.entries}
    for rows in (1, 256):
        fields = {"top_k": 8, "num_experts": 128, "rows_per_expert": rows}
        for stage in moe_stages.STAGES:
            dtype, constexprs, warps, stages = moe_stages.stage_config(
                stage, fields, "bf16", resolve_target("sm90")
            )
            entry, ptx = qdp.compile_kernel(
                stage.kernel, "sm90", dtype, constexprs, warps, stages, arts.out_dir
            )
            assert entry.key in keys, f"{stage.op_type} rows_per_expert={rows} was not in the kernels output"
            assert f".entry {entry.entry}(" in ptx


def test_kernel_aot_key_is_a_pure_function_of_the_variant():
    base = aot.Variant.make("moe_count", "sm90", "i32", {"BLOCK_P": 128, "BLOCK_E": 128})
    assert aot.Variant.make("moe_count", "h100", "i32", {"BLOCK_E": 128, "BLOCK_P": 128}) == base
    others = [
        aot.Variant.make("moe_count", "sm89", "i32", {"BLOCK_P": 128, "BLOCK_E": 128}),
        aot.Variant.make("moe_count", "sm90", "i32", {"BLOCK_P": 64, "BLOCK_E": 128}),
        aot.Variant.make("moe_count", "sm90", "i32", {"BLOCK_P": 128, "BLOCK_E": 128}, num_warps=8),
    ]
    assert len({base, *others}) == 4
    with pytest.raises(BuildError, match="unknown kernel 'softcap'"):
        aot.Variant.make("softcap", "sm90", "bf16", {})


def test_kernel_aot_reaches_all_six_targets(tmp_path):
    variants = [aot.Variant.make("moe_count", t, "i32", {"BLOCK_P": 128, "BLOCK_E": 128}) for t in PTX_TARGET]
    for v, e in zip(variants, aot.compile_variants(tmp_path, variants, jobs=2)):
        assert f".target {PTX_TARGET[v.target]}" in (tmp_path / e.ptx).read_text()
        assert (tmp_path / e.cubin).read_bytes()[:4] == b"\x7fELF" and e.registers > 0


@pytest.mark.slow  # ~20 s of ptxas on 2 cores; test_qdp.py compiles the 8-input form at D=16 in the quick tier
def test_kernel_aot_attention_with_blocks_compiles_for_sm89(tmp_path):
    """The 8-input attention takes block_ids right after seq_len (read on a sliding D=256 layer, unread on a
    full D=512 one), and otherwise the causal kernel's launch parameters; neither spills."""
    from gemma4_compile.plugins.kernels.configs import attention_fwd_variant

    sm89 = resolve_target("sm89")
    tuples = [
        attention_fwd_variant(sm89, "bf16", 256, 2, 1.0, blocks=True),
        attention_fwd_variant(sm89, "bf16", 512, 2, 1.0, blocks=True, sliding=False),
    ]
    variants = [aot.Variant.make(k, "sm89", d, c, w, s) for k, d, c, w, s in tuples]
    sliding, full = aot.compile_variants(tmp_path, variants, jobs=2)
    assert sliding.constexprs["HAS_BLOCKS"] and not full.constexprs["HAS_BLOCKS"]
    inputs, scalars, outputs = aot.kernel_io("attn_fwd")
    assert "BLK_ptr" not in inputs  # the 7-input (causal) launch is unchanged
    for e in (sliding, full):
        ptx = (tmp_path / e.ptx).read_text()
        assert ".target sm_89" in ptx and (tmp_path / e.cubin).read_bytes()[:4] == b"\x7fELF"
        assert e.spills == 0 and e.shared_bytes <= sm89.max_shared_bytes, e.kernel
        blk_inputs, blk_scalars, blk_outputs = aot.kernel_io(e.kernel)
        assert blk_inputs == [*inputs, "BLK_ptr"] and (blk_scalars, blk_outputs) == (scalars, outputs)
        assert e.params[:-2] == [*blk_inputs, *scalars, *outputs]
        declared = re.search(r"\.entry \w+\(([^)]*)\)", aot.aot_launchable_ptx(ptx, e)).group(1)
        assert declared.count(".param") == len(e.params) - 2  # what a TensorRT AOT launch passes


def test_kernel_aot_oversized_block_config_is_a_one_line_build_error(tmp_path):
    tile = {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 128, "BLOCK_E": 128, "INPUT_PRECISION": "tf32"}
    tile |= {"WEIGHT_FORMAT": "float", "QBLOCK": 0, "DownScales_ptr": None}  # float experts, as aot_configs
    v = aot.Variant.make("moe_down", "sm86", "bf16", tile, num_warps=4, num_stages=4)
    with pytest.raises(BuildError) as err:
        aot.compile_variants(tmp_path, [v], jobs=1)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("moe_down [bf16 ") and "BLOCK_N=256" in msg
    assert "bytes of shared memory on sm86, which allows 101376 per block" in msg
    assert int(msg.split(" needs ")[1].split()[0]) > 101376


def test_kernel_aot_compile_error_names_the_variant_and_the_cause(tmp_path):
    v = aot.Variant.make("ring_update", "sm90", "bf16", {"HEAD_DIM": 48, "BLOCK_R": 16, "COPY_PAST": True})
    with pytest.raises(BuildError) as err:
        aot.compile_variants(tmp_path, [v], jobs=1)
    assert str(err.value) == (
        "ring_update [bf16 BLOCK_R=16 COPY_PAST=True HEAD_DIM=48 warps=4 stages=2] on sm90: "
        "compilation failed: arange's range must be a power of 2"
    )


def test_kernel_aot_launch_checks_the_alignment_it_compiled_for(sm90):
    arts, _ = sm90
    (entry,) = [
        e for e in arts.entries if e.kernel == "moe_gate_up" and e.constexprs["BLOCK_M"] > 16
    ]  # prefill
    dims = M.launch_dims(7, 2816, 128, 704, 8)
    launch = aot.launch_params(entry, dims)
    assert launch.block == (entry.threads, 1, 1) and launch.shared_bytes == entry.shared_bytes
    bm, bn = entry.constexprs["BLOCK_M"], entry.constexprs["BLOCK_N"]
    assert launch.grid == (-(-56 // bm) + 128, -(-704 // bn), 1)
    with pytest.raises(BuildError, match="x_stride_t = 2817 is not a multiple of 16"):
        aot.launch_params(entry, {**dims, "H": 2817})
    with pytest.raises(BuildError, match="launch needs dims I"):
        aot.launch_params(entry, {k: v for k, v in dims.items() if k != "I"})


class Sym:
    """A stand-in for TensorRT shape expressions: only Sym (op) Sym|int, the order TensorRT supports."""

    def __init__(self, text: str):
        self.text = text

    def _op(self, op: str, other: Sym | int) -> Sym:
        return Sym(f"({self.text} {op} {other.text if isinstance(other, Sym) else other})")

    def __add__(self, o):
        return self._op("+", o)

    def __sub__(self, o):
        return self._op("-", o)

    def __mul__(self, o):
        return self._op("*", o)

    def __floordiv__(self, o):
        return self._op("//", o)


@pytest.mark.parametrize("target", ["sm86", "sm90"])
def test_kernel_aot_launch_arithmetic_runs_on_shape_expressions(target):
    from gemma4_compile.plugins.kernels.configs import attention_variants, moe_variants

    tgt = resolve_target(target)
    sym = {k: Sym(k) for k in ("B", "Hq", "Hkv", "S", "C", "D", "T", "H", "I", "N", "NB", "splits")}
    ints = {"G": 2, "window": 1024, "K": 8, "E": 128}  # attributes of the layer, not tensor dims
    for kernel, _, constexprs, _, _ in attention_variants(tgt, "bf16", (256, 512)) + moe_variants(
        tgt, "bf16"
    ):
        grid, scalars = aot.plan_launch(kernel, {**sym, **ints}, constexprs)
        assert len(grid) == 3 and len(scalars) == len(aot.kernel_io(kernel)[1]), kernel


def _run(kernel: str, constexprs: dict, dims: dict, tensors: dict) -> None:
    """Launch exactly as a TensorRT AOT plugin would: input pointers, int32 scalars, output pointers."""
    spec = aot.KERNELS[kernel]
    fn = getattr(__import__(spec.module, fromlist=[spec.fn]), spec.fn)
    inputs, names, outputs = aot.kernel_io(kernel)
    grid, scalars = aot.plan_launch(kernel, dims, constexprs)
    assert len(scalars) == len(names) and all(abs(int(s)) < 2**31 for s in scalars)
    # by name: an absent pointer (a constexpr None, as attn_fwd's BLK_ptr) may sit between the inputs
    args = {
        **{n: tensors[n] for n in inputs},
        **dict(zip(names, scalars)),
        **{n: tensors[n] for n in outputs},
    }
    fn[tuple(grid)](**args, **constexprs)


@pytest.mark.parametrize("blocks", [False, True], ids=["causal", "image_blocks"])
def test_kernel_aot_attention_launch_contract_reproduces_the_reference(blocks):
    B, Hq, Hkv, S, C, D, W = 2, 4, 2, 13, 8, 32, 8
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, h, S, D, generator=g) for h in (Hq, Hkv, Hkv))
    pk, pv = (torch.randn(B, Hkv, C, D, generator=g) for _ in range(2))
    past_len, seq_len = torch.tensor([11, 0]), torch.tensor([13, 9])
    block_ids = torch.tensor([[-1] * 2 + [0] * 9 + [-1] * 2, [0] * 4 + [-1] + [1] * 6 + [-1] * 2])
    constexprs, _, _ = A.aot_config(D, Hq // Hkv, "fp32", 1.0, resolve_target("sm86"), blocks)
    constexprs = {**constexprs, "BLOCK_M": 16, "BLOCK_N": 16}  # interpreter-sized tiles, same contract
    out, pko, pvo = torch.empty_like(q), torch.empty_like(pk), torch.empty_like(pv)
    tensors = dict(
        Q_ptr=q,
        K_ptr=k,
        V_ptr=v,
        PK_ptr=pk,
        PV_ptr=pv,
        PastLen_ptr=past_len,
        SeqLen_ptr=seq_len,
        O_ptr=out,
        PKO_ptr=pko,
        PVO_ptr=pvo,
    )
    if blocks:
        tensors["BLK_ptr"] = block_ids
    dims = dict(B=B, Hq=Hq, Hkv=Hkv, G=Hq // Hkv, S=S, C=C, D=D, window=W)
    _run("attn_fwd_blocks" if blocks else "attn_fwd", constexprs, dims, tensors)
    want = ops.attention_reference(q, k, v, pk, pv, past_len, seq_len, W, 1.0, block_ids if blocks else None)
    torch.testing.assert_close(out, want[0], atol=5e-6, rtol=5e-6)
    assert torch.equal(pko, want[1]) and torch.equal(pvo, want[2])


def test_kernel_aot_moe_launch_contract_reproduces_the_reference():
    """The seven MoE launches chained through the buffers of `moe.workspace`, as seven AOT plugin nodes."""
    T, H, E, inter, top_k = 9, 64, 16, 32, 4
    g = torch.Generator().manual_seed(6)
    x = torch.randn(T, H, generator=g)
    logits = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]).float() / 8
    scale = torch.rand(E, generator=g) + 0.5
    gate_up, down = torch.randn(E, 2 * inter, H, generator=g) / 8, torch.randn(E, H, inter, generator=g) / 6
    configs = M.aot_configs(E, top_k, "fp32", resolve_target("sm90").max_shared_bytes, T * top_k / E)
    configs["moe_gate_up"][0].update(BLOCK_N=32, BLOCK_K=32)  # interpreter-sized tiles, same contract
    configs["moe_down"][0].update(BLOCK_N=32, BLOCK_K=32)
    tensors = {
        name: torch.empty(shape, dtype=dtype)
        for name, (shape, dtype) in M.workspace(T, H, E, inter, top_k, torch.float32).items()
    }
    tensors.update(X_ptr=x, Logits_ptr=logits, Scale_ptr=scale, GateUp_ptr=gate_up, Down_ptr=down)
    dims = M.launch_dims(T, H, E, inter, top_k)
    for kernel in M.MOE_STAGES:
        _run(kernel, configs[kernel][0], dims, tensors)
    want = ops.moe_reference(x, logits, scale, gate_up, down, top_k)
    torch.testing.assert_close(tensors["Y_ptr"], want, atol=5e-6, rtol=5e-6)


def test_kernel_aot_parse_ptxas_log():
    log = (
        "ptxas info    : Compiling entry function '_k' for 'sm_90a'\n"
        "    184 bytes stack frame, 176 bytes spill stores, 168 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 184 bytes cumulative stack size\n"
    )
    assert aot.parse_ptxas_log(log) == {
        "registers": 255,
        "stack_bytes": 184,
        "spill_stores": 176,
        "spill_loads": 168,
    }
    assert aot.parse_ptxas_log("") == {"registers": 0, "stack_bytes": 0, "spill_stores": 0, "spill_loads": 0}


def test_kernel_aot_atomic_write_leaves_the_old_table_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "kernels.json"
    path.write_text("old")

    def boom(src, dst):
        raise OSError("disk full")

    from gemma4_compile import fsutil

    monkeypatch.setattr(fsutil.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        aot.write_atomic(path, b"new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["kernels.json"]
