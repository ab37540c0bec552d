"""Each `gemma4` op is one contract: what is generated from it (ONNX schema, plugin fields, doc table), the
registry (unknown ops are one-line errors), the one tile chooser of `kernels` and the QDPs, and the import
graph of plugins/ (no cycles, no engines)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from onnx.defs import OpSchema

from gemma4_compile import ops
from gemma4_compile.ops import docs
from gemma4_compile.ops.contract import UnknownOpError
from gemma4_compile.plugins import moe_stages as ms
from gemma4_compile.plugins import qdp, rtx
from gemma4_compile.targets import resolve_target

PACKAGE = Path(ops.__file__).resolve().parents[1]

# The schemas as they were written by hand before the contracts (the exported bytes depend on them).
_ACT = ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations")
_PLUGIN = [
    ("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace"),
    ("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version"),
]
HAND_WRITTEN = {
    "SlidingWindowAttention": dict(
        doc="Gemma 4 attention for one layer with its ring-buffer KV-cache update (see model/ops.py).",
        inputs=[(n, "T") for n in ("q", "k", "v", "past_k", "past_v")]
        + [("past_len", "I"), ("seq_len", "I"), ("block_ids", "I")],  # block_ids: optional (26B/31B images)
        outputs=[(n, "T") for n in ("out", "present_k", "present_v")],
        constraints=[_ACT, ("I", ["tensor(int64)"], "lengths")],
        attributes=sorted(
            [
                ("window", OpSchema.AttrType.INT, "sliding window W (keys incl. self); 0 = global"),
                ("scale", OpSchema.AttrType.FLOAT, "score multiplier (1.0 for Gemma 4)"),
                *_PLUGIN,
            ]
        ),
    ),
    "MoE": dict(
        doc="Gemma 4 MoE block: router softmax/top-k/renormalize/per-expert scale and GELU-tanh GLU experts.",
        inputs=[(n, "T") for n in ("x", "router_logits", "per_expert_scale", "gate_up", "down")],
        outputs=[("y", "T")],
        constraints=[_ACT],
        attributes=sorted([("top_k", OpSchema.AttrType.INT, "experts per token"), *_PLUGIN]),
    ),
}


def _describe(schema: OpSchema) -> dict:
    return dict(
        doc=schema.doc,
        inputs=[(p.name, p.type_str) for p in schema.inputs],
        outputs=[(p.name, p.type_str) for p in schema.outputs],
        constraints=[
            (c.type_param_str, list(c.allowed_type_strs), c.description) for c in schema.type_constraints
        ],
        attributes=sorted(
            (a.name, a.type, a.description) for a in schema.attributes.values()
        ),  # a map in onnx
    )


@pytest.mark.parametrize("op_type", HAND_WRITTEN)
def test_generated_schema_is_the_hand_written_one(op_type):
    schema = ops.contract(op_type).schema()
    assert (schema.name, schema.domain, schema.since_version) == (op_type, "gemma4", 1)
    assert _describe(schema) == HAND_WRITTEN[op_type]
    assert all(a.required for a in schema.attributes.values())
    optional = {p.name for p in ops.contract(op_type).inputs if p.optional}
    assert optional == ({"block_ids"} if op_type == "SlidingWindowAttention" else set())
    for p in (*schema.inputs, *schema.outputs):
        want = "Optional" if p.name in optional else "Single"
        assert p.option == getattr(OpSchema.FormalParameterOption, want)


def test_every_contract_makes_a_valid_schema_and_plugin_fields():
    for entry in ops.OPS.values():
        c = entry.contract
        schema = c.schema()
        assert [p.name for p in schema.inputs] == list(c.input_names)
        assert sorted(schema.attributes) == sorted(a.name for a in c.attributes)
        assert {p.type for p in (*c.inputs, *c.outputs)} == {t.name for t in c.type_constraints}
        narrowed = {"int": "int32", "float": "float32"}
        assert [(f.name, f.dtype) for f in c.fields] == [
            (a.name, narrowed[a.kind]) for a in c.attributes if a.plugin_field
        ]
        assert c.plugin_attributes() == {"plugin_namespace": "gemma4", "plugin_version": "1"}


def test_attribute_defaults_reach_the_schema():
    aot = ops.contract("MoERoute").schema().attributes["aot"]
    assert not aot.required and aot.default_value.i == 1


@pytest.mark.parametrize("stage", ms.STAGES, ids=lambda s: s.op_type)
def test_stage_contract_is_its_kernels_signature(stage):
    """Stage inputs/outputs are the kernel's pointer arguments in order, typed by the element aot.py compiles."""
    inputs, outputs = ms.stage_io(stage)
    c = stage.contract
    assert c.input_names == tuple(map(ms.arg_name, inputs))
    assert c.output_names == tuple(map(ms.arg_name, outputs))
    constraint = {t.name: t.types for t in c.type_constraints}
    kinds = {
        "act": ("tensor(float)", "tensor(float16)", "tensor(bfloat16)"),
        "f32": ("tensor(float)",),
        "i32": ("tensor(int32)",),
    }
    for pointer, param in zip((*inputs, *outputs), (*c.inputs, *c.outputs), strict=True):
        assert constraint[param.type] == kinds[ms.pointer_kind(stage, pointer)], param.name
    assert c.field_names == ms.FIELDS and not c.exported


def test_stage_nodes_carry_exactly_the_contracts_attributes():
    import onnx_ir as ir

    from gemma4_compile.passes.split_moe import stage_fields, stage_nodes

    inputs = [ir.Value(name=n) for n in ("x", "r", "s", "gu", "d")]
    node = ir.node("MoE", inputs, attributes={"top_k": 2}, domain="gemma4", name="m")
    nodes, _ = stage_nodes(node, stage_fields(node, num_experts=8, tokens_hint=4))
    assert len(nodes) == len(ms.STAGES)
    for stage_node in nodes:
        c = ops.contract(stage_node.op_type)
        assert sorted(stage_node.attributes) == sorted(a.name for a in c.attributes)
        assert len(stage_node.inputs) == len(c.inputs) and len(stage_node.outputs) == len(c.outputs)


# ----- the registry -------------------------------------------------------------------------------------


def test_registry_parts_resolve_and_match_the_contract():
    import inspect

    for entry in ops.OPS.values():
        for part in ("body", "reference", "kernel"):
            if getattr(entry, part) is not None:
                assert ops.part(entry.op_type, part) is not None
        if entry.kernel:  # the RTX plugin calls kernel(*inputs, **fields)
            params = list(inspect.signature(ops.part(entry.op_type, "kernel")).parameters)
            assert params[: entry.contract.num_io() - len(entry.contract.outputs)] == [
                p.name for p in entry.contract.plugin_inputs()
            ]
        if entry.body:
            assert ops.part(entry.op_type, "body").function().name == entry.op_type
        if entry.torch_op:  # the model's torch op calls the op's reference
            import torch

            from gemma4_compile.model import ops as model_ops

            assert getattr(torch.ops.gemma4, entry.torch_op).default is not None
            assert getattr(model_ops, f"{entry.torch_op}_reference") is ops.part(entry.op_type, "reference")
    assert [e.op_type for e in ops.exported()] == ["SlidingWindowAttention", "MoE"]


def test_unknown_op_is_one_line_error_never_another_kernel():
    with pytest.raises(
        UnknownOpError,
        match=r"^no gemma4 op named 'Softcap'; known: SlidingWindowAttention, SlidingWindowAttentionBlocks, MoE, ",
    ):
        ops.entry("Softcap")
    with pytest.raises(UnknownOpError, match="no gemma4 op named 'Softcap'"):
        rtx.kernel_impl("Softcap")  # used to fall through to the MoE wrapper
    with pytest.raises(UnknownOpError, match="gemma4 op 'MoERoute' has no kernel"):
        rtx.kernel_impl("MoERoute")
    with pytest.raises(UnknownOpError):
        ms.stage_for("Softcap")
    from gemma4_compile.export import custom_ops

    with pytest.raises(UnknownOpError, match="gemma4 op 'MoEDown' has no body"):
        custom_ops.functions({"MoEDown"})


def test_plugins_come_from_the_registry():
    assert [s.op_type for s in rtx.specs()] == ["SlidingWindowAttention", "MoE"]
    attention = ["gemma4::SlidingWindowAttention", "gemma4::SlidingWindowAttentionBlocks"]  # 7 and 8 inputs
    assert qdp.plugin_ids() == [*attention, *(s.plugin_id for s in ms.STAGES)]
    assert [s.kernel for s in ms.STAGES] == [ops.entry(s.op_type).aot_kernel for s in ms.STAGES]


# ----- one tile chooser ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["sm100", "sm90"])
def test_qdp_asks_for_the_variants_kernels_compiles(target):
    """A full-TensorRT build finds its kernels in a `gemma4-compile kernels` output: the attention of every
    GQA group and the MoE stages at decode and prefill rows are variants `kernels` compiles for the target."""
    from gemma4_compile.plugins import aot

    gpu = resolve_target(target)
    compiled = set(aot.default_variants(gpu, "bf16", head_dims=(256, 512)))
    for head_dim in (256, 512):
        for group in (1, 2, 8, 16):
            variant = qdp.attention_variant(gpu, "bf16", head_dim, group, 1.0)
            assert variant in compiled, f"attention D={head_dim} G={group} on {target}: {variant.label()}"
            # the 8-input form (block_ids): read on Gemma 4's sliding layers (D=256), not on its full ones
            blocks = qdp.attention_variant(gpu, "bf16", head_dim, group, 1.0, True, sliding=head_dim == 256)
            assert blocks in compiled and blocks.kernel == "attn_fwd_blocks", blocks.label()
    for rows in (1, 256):
        fields = {"top_k": 8, "num_experts": 128, "rows_per_expert": rows}
        for stage in ms.STAGES:
            assert qdp.stage_variant(stage, fields, "bf16", gpu) in compiled, (stage.op_type, rows, target)


def test_sm100_gets_its_own_attention_tile():
    """The target matters: sm100's 228 KiB of shared memory holds the 64x64 tile for D=256, sm90's does not."""
    sm100 = qdp.attention_variant(resolve_target("sm100"), "bf16", 256, 2, 1.0)
    sm90 = qdp.attention_variant(resolve_target("sm90"), "bf16", 256, 2, 1.0)
    assert dict(sm100.constexprs)["BLOCK_N"] == 64 and dict(sm90.constexprs)["BLOCK_N"] == 32


@pytest.mark.parametrize("target", ["sm86", "sm90", "sm100"])
def test_moe_wrapper_and_aot_pick_the_same_gemm_tile_at_gemma4_widths(target):
    """The RTX plugin's torch wrapper knows the width min(H, I) and prunes with it; the AOT variants cannot.
    At 26B-A4B's H=2816, I=704 the pruning keeps the first tile, so both run the same GEMM."""
    from gemma4_compile.plugins.kernels import moe as M

    smem = resolve_target(target).max_shared_bytes
    for rows in (1, 256):
        known, aot = M.gemm_tile(rows, smem, 704), M.gemm_tile(rows, smem)
        assert (known.kwargs, known.num_warps, known.num_stages) == (
            aot.kwargs,
            aot.num_warps,
            aot.num_stages,
        )
    tiny = M.gemm_tile(256, resolve_target("sm100").max_shared_bytes, 32)  # H = 64-wide test models
    assert tiny.kwargs["BLOCK_N"] <= 64


@pytest.mark.parametrize("target", ["sm86", "sm90", "sm120"])
@pytest.mark.parametrize("weight_format", ["float", "int4", "fp8"])
def test_every_moe_gemm_tile_fits_its_targets_shared_memory(target, weight_format):
    """gate_up stages (BM + 2 BN) x BK bf16 per pipeline stage: a tile over the target's shared memory would fail
    to compile in a plugin build, not in this suite (the interpreter has no shared memory)."""
    from gemma4_compile.plugins.kernels import moe as M

    smem = resolve_target(target).max_shared_bytes
    for rows in (1, 16, 64, 256):
        for c in M.gemm_configs(rows, smem, weight_format):
            bm, bn, bk = (c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            assert (bm + 2 * bn) * bk * 2 * c.num_stages <= smem, (rows, c)
            assert bm <= 16 or rows > 16  # decode-shaped batches never get prefill tiles


def test_decode_splits_fill_one_wave_and_no_more():
    """One split program per SM (they hold most of its shared memory): splits x B x Hkv never exceeds the SMs,
    never exceeds the cache's key tiles, and is at least 1 when the heads alone fill the GPU."""
    from gemma4_compile.plugins.kernels.attention import decode_splits

    assert decode_splits(1, 8, 1024, 64, 132) == 16  # 26B-A4B sliding layer on an H200: 128 programs
    assert decode_splits(1, 2, 32768, 32, 132) == 66  # 26B-A4B global layer
    for batch, kv_heads, slots, block_n in (
        (1, 16, 1024, 64),
        (4, 4, 32768, 32),
        (1, 1, 64, 64),
        (64, 16, 512, 64),
    ):
        splits = decode_splits(batch, kv_heads, slots, block_n, 132)
        assert 1 <= splits <= -(-(slots + 1) // block_n)
        assert splits * batch * kv_heads <= 132 or splits == 1


# ----- docs and imports ---------------------------------------------------------------------------------


def test_doc_op_table_is_current():
    text = docs.DOC_PATH.read_text()
    assert docs.rewrite(text) == text, "run: python -m gemma4_compile.ops.docs"
    assert all(f"| `{t}` |" in text for t in ops.OPS)


def test_doc_rewrite_replaces_only_the_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"intro\n{docs.BEGIN}\nstale\n{docs.END}\noutro\n")
    assert docs.main(page) and not docs.main(page)
    assert page.read_text() == f"intro\n{docs.render_table()}\noutro\n"


def _import_graph(*roots: str) -> dict[str, set[str]]:
    """Module -> the modules under `roots` it imports anywhere in its body (lazy imports included)."""
    modules = {}
    for path in (p for root in roots for p in (PACKAGE / root).rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                found |= {target} | {f"{target}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {t for t in found if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def test_plugins_have_no_import_cycles_and_do_not_import_engines():
    graph = _import_graph("plugins", "ops", "export")

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(
            n == goal or (n not in seen and not seen.add(n) and reaches(n, goal, seen)) for n in graph[start]
        )

    cycles = [m for m in graph if reaches(m, m, set())]
    assert not cycles, f"import cycles through {cycles}"
    sources = [p.read_text() for p in (PACKAGE / "plugins").rglob("*.py")]
    assert not any("engines" in line for s in sources for line in s.splitlines() if "import" in line)


def test_contracts_import_without_torch_triton_or_tensorrt():
    import subprocess

    code = (
        "import sys, gemma4_compile.ops, gemma4_compile.plugins.registration; "
        "print([m for m in ('torch', 'triton', 'tensorrt', 'tensorrt_rtx') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
