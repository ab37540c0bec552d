"""Full-TensorRT quickly deployable plugins: pure parts on CPU, the `tensorrt.plugin` parts where it exists.

`tensorrt.plugin` ships only with full TensorRT, which PyPI cannot install (docs/tensorrt.md, what installs where), so
those tests skip with that reason; nothing here stands in for TensorRT. The decorated functions are checked on
CPU by reading qdp.py's syntax tree against the plugin specs.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import numpy as np
import pytest

from gemma4_compile.errors import BackendUnavailable
from gemma4_compile.ops.attention import SLIDING_WINDOW_ATTENTION_BLOCKS as ATTENTION_BLOCKS
from gemma4_compile.passes import SplitMoE, run_on_proto
from gemma4_compile.plugins import moe_stages, qdp
from gemma4_compile.plugins.registration import ATTENTION, MOE, PluginError

QDP_REASON = "needs full TensorRT (tensorrt.plugin), not installable from PyPI"


def _full_tensorrt():
    try:
        return importlib.import_module("tensorrt"), importlib.import_module("tensorrt.plugin")
    except ImportError:
        return None


# ----- pure parts -------------------------------------------------------------------------------


def test_skip_reason_is_the_modules_own():
    assert qdp.QDP_UNAVAILABLE == QDP_REASON


def test_autotune_ties_activations_and_keeps_lengths_int64():
    tied = "FP32|FP16|BF16"
    assert qdp.autotune_types(ATTENTION) == ", ".join([tied] * 5 + ["INT64"] * 2 + [tied] * 3)
    assert qdp.autotune_types(MOE, ("FP16", "BF16")) == ", ".join(["FP16|BF16"] * 6)


def test_dims_are_what_aot_attn_fwd_launches_with():
    from gemma4_compile.plugins import aot

    dims = qdp.attention_dims((2, 8, 5, 256), (2, 1, 5, 256), (2, 1, 512, 256), window=128)
    assert dims == {"B": 2, "Hq": 8, "Hkv": 1, "G": 8, "S": 5, "C": 512, "D": 256, "window": 128}
    assert set(dims) == set(aot.KERNELS[qdp.ATTENTION_KERNEL].dims)


def _attn_fwd():
    from gemma4_compile.plugins import aot

    spec = aot.KERNELS[qdp.ATTENTION_KERNEL]
    return spec, getattr(importlib.import_module(spec.module), spec.fn)


@pytest.mark.parametrize(
    ("head_dim", "group", "dtype"), [(256, 8, "bf16"), (512, 2, "fp16"), (16, 2, "fp32")]
)
def test_attention_launch_matches_the_kernel_signature_and_the_torch_wrapper(head_dim, group, dtype):
    """One fused launch: constexprs are exactly the kernel's, one int32 per scalar parameter, and the grid
    the torch wrapper `attention_fwd` would use for the same config."""
    import triton

    from gemma4_compile.plugins import aot
    from gemma4_compile.plugins.kernels import attention as kernels
    from gemma4_compile.targets import resolve_target

    _, fn = _attn_fwd()
    constexprs, warps, stages = qdp.attention_config(head_dim, group, dtype, 0.5, resolve_target("sm90"))
    absent = set(aot.KERNELS[qdp.ATTENTION_KERNEL].absent)  # BLK_ptr: no block_ids, a constexpr None
    assert set(constexprs) == {a for a in fn.arg_names if a.isupper()} | absent  # constexprs are UPPER_CASE
    assert constexprs["BLOCK_M"] >= group and constexprs["FUSE_RING"] and constexprs["SCALE"] == 0.5
    B, Hkv, S, C = 3, 2, 37, 64
    dims = qdp.attention_dims((B, Hkv * group, S, head_dim), (B, Hkv, S, head_dim), (B, Hkv, C, head_dim), 16)
    grid, scalars = qdp.launch_values(qdp.ATTENTION_KERNEL, dims, constexprs)
    params = aot.kernel_io(qdp.ATTENTION_KERNEL)[1]
    assert len(scalars) == len(params) and scalars[-5:] == [S, C, Hkv, group, 16]
    positions = constexprs["BLOCK_M"] // group
    ring = -(-C // constexprs["BLOCK_R"])
    assert grid == (-(-S // positions) + ring, B * Hkv, 1)
    chosen = triton.Config(
        {"BLOCK_M": constexprs["BLOCK_M"], "BLOCK_N": constexprs["BLOCK_N"]}, warps, stages
    )
    assert kernels.keep_fwd(chosen, head_dim, resolve_target("sm90").max_shared_bytes)


def test_launch_values_names_known_kernels():
    with pytest.raises(PluginError, match=r"aot.py has no 'softcap' kernel; known: \['attn_"):
        qdp.launch_values("softcap", {}, {})


@pytest.mark.parametrize("blocks", [False, True], ids=["7_inputs", "8_inputs_block_ids"])
def test_attention_kernel_compiles_to_ptx_on_cpu(tmp_path, monkeypatch, blocks):
    """What aot_impl hands TensorRT: entry name, PTX, block and shared memory. Triton's compiled entry also
    takes two scratch pointers, which TensorRT's AOT launch (inputs, scalars, outputs) does not pass: the PTX
    handed over lists exactly the launched parameters, and ptxas still accepts it."""
    import re
    import subprocess

    import triton

    from gemma4_compile.targets import resolve_target

    monkeypatch.setattr(qdp, "AOT_CACHE", tmp_path)
    constexprs, warps, stages = qdp.attention_config(16, 2, "fp16", 1.0, resolve_target("sm90"), blocks)
    kernel = qdp.attention_kernel(blocks)
    entry, ptx = qdp.compile_kernel(kernel, "sm90", "fp16", constexprs, warps, stages)
    assert f".entry {entry.entry}(" in ptx and ".target sm_90" in ptx
    assert entry.threads == 32 * warps and entry.shared_bytes > 0
    _, scalars = qdp.launch_values(
        kernel, qdp.attention_dims((1, 4, 3, 16), (1, 2, 3, 16), (1, 2, 4, 16), 4), constexprs
    )
    n_tensors = ATTENTION.num_io(8 if blocks else 7)  # block_ids: one more input pointer, no more scalars
    assert len(entry.params) == n_tensors + len(scalars) + 2
    assert entry.params[-2:] == ["triton_scratch_0", "triton_scratch_1"]
    declared = re.search(r"\.entry \w+\(([^)]*)\)", ptx).group(1)
    assert declared.count(".param") == n_tensors + len(scalars)
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
    (tmp_path / "launchable.ptx").write_text(ptx)
    done = subprocess.run(
        [str(ptxas), "-arch=sm_90a", str(tmp_path / "launchable.ptx"), "-o", str(tmp_path / "k.cubin")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("blocks", "window"), [(False, 4), (True, 4), (True, 0)], ids=["7", "8_sliding", "8_full"]
)
def test_attention_aot_impls_launch_their_kernel(tmp_path, monkeypatch, blocks, window):
    """Both attention QDPs' aot_impl body (`_attention_result`) with stand-ins for the few `tensorrt.plugin`
    classes it builds its answer from: the 8-input plugin launches `attn_fwd_blocks` (block ids read on sliding
    layers only), the 7-input one `attn_fwd`, with one int32 per scalar and the PTX's entry."""
    from types import SimpleNamespace

    from gemma4_compile.targets import resolve_target

    monkeypatch.setattr(qdp, "AOT_CACHE", tmp_path)
    trtp = SimpleNamespace(
        KernelLaunchParams=SimpleNamespace,
        SymInt32=int,
        SymIntExprs=SimpleNamespace(from_tuple=tuple),
    )
    desc = lambda *shape: SimpleNamespace(shape_expr=shape, dtype=SimpleNamespace(name="HALF"))  # noqa: E731
    q, k, past_k = desc(1, 4, 3, 16), desc(1, 2, 3, 16), desc(1, 2, 4, 16)
    window_attr, scale = np.array([window], np.int32), np.array([1.0], np.float32)
    entry, ptx, params, scalars = qdp._attention_result(
        trtp, q, k, past_k, window_attr, scale, ("sm90", None), blocks
    )
    kernel = qdp.attention_kernel(blocks)
    assert kernel == ("attn_fwd_blocks" if blocks else "attn_fwd") and f".entry {entry}(" in ptx
    constexprs, warps, _ = qdp.attention_config(
        16, 2, "fp16", 1.0, resolve_target("sm90"), blocks, window > 0
    )
    dims = qdp.attention_dims(q.shape_expr, k.shape_expr, past_k.shape_expr, window)
    grid, want = qdp.launch_values(kernel, dims, constexprs)
    assert (params.grid_x, params.grid_y, params.grid_z) == grid and params.block_x == 32 * warps
    assert list(scalars) == want


def test_a_kernel_that_reads_its_scratch_pointer_is_refused():
    from types import SimpleNamespace

    from gemma4_compile.errors import BuildError
    from gemma4_compile.plugins import aot

    head = ".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1\n)\n"
    entry = SimpleNamespace(kernel="k", params=["X_ptr", "triton_scratch_0"], scratch_bytes=64)
    with pytest.raises(BuildError, match=r"k: uses Triton scratch memory \(64 bytes, parameters k_param_1\)"):
        aot.aot_launchable_ptx(head + "{\n\tld.param.u64 %rd1, [k_param_1];\n}", entry)
    kept = aot.aot_launchable_ptx(head + "{\n\tld.param.u64 %rd1, [k_param_0];\n}", entry)
    assert kept.startswith(".visible .entry k(\n\t.param .u64 k_param_0\n)")


def test_static_dims_and_scalars():
    assert qdp.static(np.int64(256), "head dim D") == 256
    assert qdp.static(8, "query heads Hq") == 8
    assert qdp.attr_scalar(np.array([4], np.int32), "window") == 4
    assert qdp.attr_scalar(np.array([0.5], np.float32), "scale") == 0.5
    with pytest.raises(PluginError, match="attribute 'top_k' must hold one value, got 2"):
        qdp.attr_scalar(np.array([1, 2], np.int32), "top_k")


def test_triton_dtypes():
    assert [qdp.triton_dtype(t) for t in ("FLOAT", "HALF", "BF16")] == ["fp32", "fp16", "bf16"]
    with pytest.raises(
        PluginError, match=r"no gemma4 kernel for dtype INT8; supported: \['BF16', 'FLOAT', 'HALF'\]"
    ):
        qdp.triton_dtype("INT8")


def test_without_a_plugin_module_registration_says_why():
    trt = pytest.importorskip("tensorrt_rtx", reason="needs tensorrt_rtx (pip install .[rtx])")
    with pytest.raises(
        BackendUnavailable, match=r"gemma4 QDP plugins needs full TensorRT \(tensorrt.plugin\)"
    ):
        qdp.register_qdp(trt)  # RTX ships no tensorrt.plugin


# ----- the decorated functions, read from source ------------------------------------------------


def _decorated() -> dict[tuple[str, str], ast.FunctionDef]:
    """(decorator, spec name) -> function, for every @trtp.<decorator>(<SPEC>.plugin_id) in qdp.py."""
    found = {}
    for node in ast.walk(ast.parse(inspect.getsource(qdp))):
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute):
                    target = deco.args[0]
                    assert isinstance(target, ast.Attribute) and target.attr == "plugin_id"
                    found[(deco.func.attr, target.value.id)] = node
    return found


SPEC_NAMES = {"ATTENTION": ATTENTION, "ATTENTION_BLOCKS": ATTENTION_BLOCKS}  # MoE stages: test_moe_stages.py


def test_every_op_has_register_autotune_and_aot_impl():
    assert set(_decorated()) == {
        (d, name) for d in ("register", "autotune", "aot_impl") for name in SPEC_NAMES
    }


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_decorated_signatures_follow_the_spec(name):
    spec, fns = SPEC_NAMES[name], _decorated()
    fields = [f.name for f in spec.fields]
    plugin_inputs = [
        p.name for p in spec.plugin_inputs()
    ]  # 7 inputs; the blocks plugin's block_ids is required
    args = lambda fn: [a.arg for a in fn.args.args]  # noqa: E731
    assert args(fns[("register", name)]) == [*plugin_inputs, *fields]
    assert args(fns[("autotune", name)]) == [*plugin_inputs, "outputs"]
    assert args(fns[("aot_impl", name)]) == [*plugin_inputs, *fields, "outputs", "tactic"]
    for fn in (fns[("register", name)], fns[("aot_impl", name)]):
        annotations = {a.arg: ast.unparse(a.annotation) for a in fn.args.args}
        assert {f.name: annotations[f.name] for f in spec.fields} == {
            f.name: f"npt.NDArray[np.{f.dtype}]" for f in spec.fields
        }  # the parser's INT32/FLOAT32, not QDP's int->INT64 / float->FLOAT64
        assert {annotations[i] for i in plugin_inputs} == {"TensorDesc"}
    n_out = len(spec.outputs)
    outputs = "TensorDesc" if n_out == 1 else f"tuple[{', '.join(['TensorDesc'] * n_out)}]"
    assert ast.unparse(fns[("register", name)].returns) == outputs
    assert (
        ast.unparse(fns[("aot_impl", name)].args.args[-2].annotation)
        == f"tuple[{', '.join(['TensorDesc'] * n_out)}]"
    )


# ----- full TensorRT ----------------------------------------------------------------------------


@pytest.mark.trt
def test_register_qdp_defines_attention_and_the_moe_stages_once():
    trt, trtp = _full_tensorrt()
    assert qdp.register_qdp(trt) == qdp.register_qdp(trt) == qdp.plugin_ids()
    assert all(qdp.is_registered(trtp, s) for s in (ATTENTION, *moe_stages.STAGES))


@pytest.mark.trt
def test_full_tensorrt_parser_takes_the_qdps(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    trt, _ = _full_tensorrt()
    qdp.register_qdp(trt)
    f, i64, attrs = (
        TensorProto.FLOAT,
        TensorProto.INT64,
        {"plugin_namespace": "gemma4", "plugin_version": "1", "aot": 1},
    )
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [
            helper.make_node(
                "SlidingWindowAttention",
                ["q", "k", "v", "pk", "pv", "pl", "sl"],
                ["o", "npk", "npv"],
                name="attn0",
                domain="gemma4",
                window=4,
                scale=1.0,
                **attrs,
            ),
            helper.make_node(
                "MoE", ["x", "r", "s", "gu", "d"], ["y"], name="moe0", domain="gemma4", top_k=2, **attrs
            ),
        ],
        "qdp",
        [
            vi("q", f, [1, 4, 3, 16]),
            vi("k", f, [1, 2, 3, 16]),
            vi("v", f, [1, 2, 3, 16]),
            vi("pk", f, [1, 2, 4, 16]),
            vi("pv", f, [1, 2, 4, 16]),
            vi("pl", i64, [1]),
            vi("sl", i64, [1]),
            vi("x", f, [3, 16]),
            vi("r", f, [3, 4]),
            vi("s", f, [4]),
            vi("gu", f, [4, 16, 16]),
            vi("d", f, [4, 16, 8]),
        ],
        [
            vi("o", f, [1, 4, 3, 16]),
            vi("npk", f, [1, 2, 4, 16]),
            vi("npv", f, [1, 2, 4, 16]),
            vi("y", f, [3, 16]),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("gemma4", 1)]
    )
    split = SplitMoE(tokens_hint=3)
    run_on_proto(model, [split])  # as engines/prepare.py does with the stages registered
    assert split.split == 1
    path = tmp_path / "qdp.onnx"
    onnx.save(model, path)
    logger = trt.Logger(trt.Logger.WARNING)
    network = trt.Builder(logger).create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(path)), [parser.get_error(i).desc() for i in range(parser.num_errors)]
    kinds = {network.get_layer(i).name: network.get_layer(i).type for i in range(network.num_layers)}
    stages = [kinds[f"moe0/{s.op_type}"] for s in moe_stages.STAGES]
    assert {kinds["attn0"], *stages} == {trt.LayerType.PLUGIN_V3}
