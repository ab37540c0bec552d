"""Quantized exports of tiny presets: the graph, the manifest, the data file, the refusals, and the
correctness gate (onnxruntime at accuracy level 0 vs the fake-quant PyTorch reference, at fp32 tolerances, on
the default cases: prompts up to 3W + 3 with decode past the sliding window)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import pytest
import torch
from quant_support import swap_nibbles

from gemma4_compile.export import ExportManifest
from gemma4_compile.export.weights import DATA_FILE, write_weight_file
from gemma4_compile.model.weights import TensorEntry
from gemma4_compile.quant import rtn
from gemma4_compile.quant.formats import LM_HEAD, QuantRequest, plan_quant
from gemma4_compile.validate.validate import validate

STEPS = 4  # decode steps after each prompt; the long prompt already wraps the sliding window three times


def _nbits_nodes(export) -> list[onnx.NodeProto]:
    proto = onnx.load(str(export / "decoder.onnx"), load_external_data=False)
    return [n for n in proto.graph.node if n.op_type == "MatMulNBits"], proto


def test_every_quantized_tensor_is_one_matmulnbits_and_no_float_copy_is_left(
    make_quant_export, make_checkpoint
):
    out = make_quant_export("tiny-e2b", "int4")
    m = ExportManifest.load(out)
    assert m.weight_format == "int4" and m.quant.block_size == 32 and m.quant.method == "rtn"
    assert json.loads((out / "export.json").read_text()) == m.to_json()  # the quantization record round-trips
    nodes, proto = _nbits_nodes(out)
    assert len(nodes) == len(m.quant.tensors) - len(m.quant.row_tables)  # the tables are the embed graph's
    assert {next(a.i for a in n.attribute if a.name == "bits") for n in nodes} == {4}
    # the int8 LM head at accuracy level 0: one 4-bit MatMulNBits over two rows per vocabulary row, zero points 8/0
    (head,) = [n for n in nodes if len(n.input) == 4]
    assert next(a.i for a in head.attribute if a.name == "N") == 2 * m.spec.vocab_size
    inits = {i.name for i in proto.graph.initializer}
    assert not any(n.endswith("proj.weight") and "self_attn" in n for n in inits)  # no float q/k/v/o left
    assert "model.embed_tokens.weight" not in inits  # the decoder's LM head is the quantized copy
    assert any("per_layer_projection.weight" in n for n in inits)  # PLE projections stay float
    fp32_checkpoint = (make_checkpoint("tiny-e2b") / "model.safetensors").stat().st_size
    assert (out / "weights.data").stat().st_size < 0.6 * fp32_checkpoint
    assert m.quant.tensors[LM_HEAD] == "int8"


def test_graph_only_layout_matches_the_written_one(tmp_path):
    """The placements a graph-only export records are the ones the writer produces, codes then scales."""
    w = np.random.default_rng(0).standard_normal((8, 40)).astype(np.float32)
    (tmp_path / "t.bin").write_bytes(w.tobytes())
    entries = {
        name: TensorEntry(name, tmp_path / "t.bin", 0, w.nbytes, torch.float32, w.shape)
        for name in ("a.weight", "layers.0.mlp.up_proj.weight", "z.weight")
    }
    quant = plan_quant(QuantRequest("int4", 32), sorted(entries), "fp32")
    (tmp_path / "out").mkdir()
    written = write_weight_file(tmp_path / "out", entries, torch.float32, quant=quant)
    assert written == write_weight_file(tmp_path, entries, torch.float32, write_data=False, quant=quant)
    q = written["layers.0.mlp.up_proj.weight"]
    data = (tmp_path / "out" / DATA_FILE).read_bytes()
    assert len(data) == written["z.weight"].offset + w.nbytes
    codes, scales = rtn.quantize_rows(w, 4, 32)
    assert data[q.codes.offset : q.codes.offset + q.codes.length] == rtn.pack_matmulnbits(codes, 4).tobytes()
    assert data[q.scales.offset : q.scales.offset + q.scales.length] == scales.tobytes()


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_per_expert_scale_is_folded_into_the_down_weights_before_rounding(tmp_path, fmt):
    """The writer multiplies each expert's down rows by its per_expert_scale (not a power of two, one negative)
    and writes ones in its place: the codes are those of the unfolded weights and the scales carry |p|."""
    from gemma4_compile.quant.encode import encode_rows

    rng = np.random.default_rng(0)
    E, H, I = 4, 8, 64  # noqa: E741
    down = rng.standard_normal((E, H, I)).astype(np.float32)
    p = np.array([0.7, 1.3, -0.45, 2.9], dtype=np.float32)
    tensors = {"layers.0.experts.down_proj": down, "layers.0.router.per_expert_scale": p}
    entries = {}
    for name, t in tensors.items():
        (tmp_path / name).write_bytes(t.tobytes())
        entries[name] = TensorEntry(name, tmp_path / name, 0, t.nbytes, torch.float32, t.shape)
    quant = plan_quant(QuantRequest(fmt, 32), sorted(entries), "fp32")
    assert quant.folded == {"layers.0.experts.down_proj": "layers.0.router.per_expert_scale"}
    (tmp_path / "out").mkdir()
    written = write_weight_file(tmp_path / "out", entries, torch.float32, quant=quant)
    data = (tmp_path / "out" / DATA_FILE).read_bytes()
    ones = written["layers.0.router.per_expert_scale"]
    assert data[ones.offset : ones.offset + ones.length] == np.ones(E, np.float32).tobytes()
    q = written["layers.0.experts.down_proj"]
    signed = down * np.sign(p)[:, None, None]  # a negative scale flips the codes' signs
    codes, scales = encode_rows(fmt, signed.reshape(-1, I), 32, q.graph)
    assert data[q.codes.offset : q.codes.offset + q.codes.length] == codes
    stored = np.frombuffer(data[q.scales.offset : q.scales.offset + q.scales.length], np.float32)
    expected = scales.reshape(E, H, -1) * np.abs(p)[:, None, None]
    np.testing.assert_allclose(stored.reshape(E, H, -1), expected, rtol=1e-6)


def test_moe_experts_run_as_one_matmulnbits_pair_per_expert_and_match_the_fake_quant_reference(
    make_quant_export, corrupt
):
    """The 26B-like preset on onnxruntime: no MoE node is left; each expert of each MoE layer is an `If` holding its
    own two MatMulNBits, reading views of the stacked codes (no float expert left, no byte written twice); the
    export matches the fake-quant reference at fp32 tolerances, and swapped nibbles in the expert codes alone fail
    it."""
    import onnx_ir as ir

    out = make_quant_export("tiny-26b-a4b", "int4")
    manifest = ExportManifest.load(out)
    quant, spec = manifest.quant, manifest.spec
    assert quant.graph == "com.microsoft.MatMulNBits" and quant.roles["moe_experts"] == "int4"
    model = ir.load(out / "decoder.onnx")
    moe_layers = sum(p.moe for p in spec.layers)
    assert not [n for n in model.graph if n.op_type == "MoE"]
    assert not [c for c in manifest.custom_nodes if c["op_type"] == "MoE"]
    ifs = [n for n in model.graph if n.op_type == "If"]
    assert len(ifs) == moe_layers * spec.num_experts
    matmuls = [m for n in ifs for m in n.attributes["then_branch"].as_graph() if m.op_type == "MatMulNBits"]
    assert len(matmuls) == 2 * len(ifs)
    experts = {n: v for n, v in model.graph.initializers.items() if ".experts." in n}
    codes = [v for n, v in experts.items() if n.endswith("_Q4")]
    assert len(codes) == 2 * moe_layers * spec.num_experts and all(v.shape.rank() == 3 for v in codes)
    assert len(experts) == 2 * len(codes)  # codes and scales, nothing float
    spans = sorted((v.const_value.offset, v.const_value.length) for v in codes)
    assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(spans))  # views that never overlap
    assert (
        len(quant.folded) == moe_layers
    )  # per_expert_scale lives in the down codes' scales; the graph reads ones
    scales = [v for n, v in model.graph.initializers.items() if n.endswith("per_expert_scale")]
    assert len(scales) == moe_layers and all((v.const_value.numpy() == 1).all() for v in scales)
    report = validate(out, steps=STEPS, write=False)
    assert report.passed, report.failure_message()
    broken = corrupt(out, onnx.TensorProto.UINT8, swap_nibbles, "_Q4", contains="experts.down_proj")
    assert not validate(broken, steps=STEPS, write=False).passed


def test_moe_experts_take_the_dequantize_form_for_tensorrt_and_match_the_fake_quant_reference(
    make_quant_export,
):
    """fp8 experts (a TensorRT format, run by onnxruntime too): codes [E, N, K] dequantized along K by one
    DequantizeLinear before the MoE node, which stays."""
    import onnx_ir as ir

    out = make_quant_export("tiny-26b-a4b", "fp8")
    spec = ExportManifest.load(out).spec
    model = ir.load(out / "decoder.onnx")
    dq = [n for n in model.graph if n.op_type == "DequantizeLinear" and ".experts." in n.inputs[0].name]
    assert len(dq) == 2 * sum(p.moe for p in spec.layers)
    assert {n.attributes["axis"].as_int() for n in dq} == {2}
    assert all(n.inputs[0].dtype == ir.DataType.FLOAT8E4M3FN and n.inputs[0].shape.rank() == 3 for n in dq)
    assert len([n for n in model.graph if n.op_type == "MoE"]) == len(dq) // 2
    report = validate(out, steps=STEPS, write=False)
    assert report.passed, report.failure_message()


@pytest.mark.parametrize(
    "preset,fmt,block",
    [
        *(
            (p, f, b)
            for p in ("tiny-e2b", "tiny-31b")
            for f, b in (("int4", 32), ("int4", 128), ("int8", 32))
        ),
        ("tiny-26b-a4b", "int4", 128),  # int4 b32 in the expert test above
        ("tiny-26b-a4b", "int8", 32),  # 8-bit MatMulNBits per expert
    ],
)
def test_ort_matches_the_fake_quant_reference_at_fp32_tolerances(make_quant_export, preset, fmt, block):
    report = validate(make_quant_export(preset, fmt, block), steps=STEPS, write=False)
    assert report.passed, report.failure_message()
    q = report.quality  # against the unquantized model: reported, not gated
    assert q is not None and q.format == fmt and not q.gated and not q.failures
    assert 0 < q.kl_mean <= q.kl_max and 0 <= q.top1 <= 1


def test_mse_scales_pass_the_gate_and_lower_the_weight_error(make_quant_export, make_checkpoint):
    """--quant-method mse: still exactly what the fake-quant reference computes, and the exported weights are
    nearer the checkpoint's than absmax RTN's (logit KL on random weights is noise either way: not asserted)."""
    from safetensors.numpy import load_file

    from gemma4_compile.quant.encode import dequantized_rows

    out = make_quant_export("tiny-e2b", "int4", method="mse")
    report = validate(out, steps=STEPS, write=False)
    assert report.passed, report.failure_message()
    quant = ExportManifest.load(out).quant
    assert quant.method == "mse"
    tensors = {}
    for f in sorted(make_checkpoint("tiny-e2b").glob("*.safetensors")):
        tensors.update(load_file(f))
    errors = {"rtn": 0.0, "mse": 0.0}
    for name, fmt in quant.tensors.items():
        if fmt != "int4":
            continue
        w = tensors[f"model.language_model.{name}"].astype(np.float32)
        for method in errors:
            deq = dequantized_rows(fmt, w, quant.block_size, quant.graph, "fp32", method=method)
            errors[method] += float(((deq - w) ** 2).sum())
    assert errors["mse"] < 0.95 * errors["rtn"], errors


def test_quality_gate_fails_only_when_asked(make_quant_export):
    """Random weights: int4 moves the logits far from the float model's (KL ~0.2 on tiny-e2b); the gate says so
    in one line only with quality_gate, while correctness still passes."""
    report = validate(make_quant_export("tiny-e2b", "int4"), steps=1, write=False, quality_gate=True)
    assert all(c.passed for c in report.cases) and not report.passed
    assert report.failure_message().startswith("quality gate: KL mean ")
    assert "\n" not in report.failure_message()


def test_int8_at_level_0_runs_as_split_4bit_rows_and_swapped_nibbles_fail_the_gate(
    make_quant_export, corrupt
):
    """An int8 export at accuracy level 0: every linear is one 4-bit MatMulNBits over split rows (with zero
    points), no native 8-bit node (onnxruntime's is a dequantize-per-call fallback at level 0); it passed the gate
    above, and swapping the two nibbles of every byte of the split codes fails it."""
    out = make_quant_export("tiny-e2b", "int8")
    nodes, _ = _nbits_nodes(out)
    assert nodes and all(len(n.input) == 4 for n in nodes)
    assert {next(a.i for a in n.attribute if a.name == "bits") for n in nodes} == {4}
    broken = corrupt(out, onnx.TensorProto.UINT8, swap_nibbles, "_Q8")
    assert not validate(broken, steps=STEPS, write=False).passed


def test_swapped_nibbles_fail_the_gate(make_quant_export, corrupt):
    """The same export with the two int4 codes of every byte swapped (the packing bug a layout change makes)."""
    out = corrupt(make_quant_export("tiny-e2b", "int4"), onnx.TensorProto.UINT8, swap_nibbles, "_Q4")
    assert not validate(out, steps=STEPS, write=False).passed


def test_engine_build_of_an_onnxruntime_quantized_export_names_the_tensorrt_form(make_quant_export):
    from gemma4_compile.engines import read_export
    from gemma4_compile.errors import BuildError

    with pytest.raises(BuildError, match=r"for TensorRT export with --dtype bf16 or fp16 --quant int4"):
        read_export(make_quant_export("tiny-e2b", "int4"))


# ----- the TensorRT form: fp16/bf16 exports with DequantizeLinear weights -------------------------------------


def _dq_nodes(export) -> tuple[list[onnx.NodeProto], onnx.ModelProto]:
    proto = onnx.load(str(export / "decoder.onnx"), load_external_data=False)
    return [n for n in proto.graph.node if n.op_type == "DequantizeLinear"], proto


def test_every_quantized_tensor_is_one_blockwise_dequantize_with_positive_scales(make_quant_export):
    out = make_quant_export("tiny-e2b", "int4", dtype="fp16")
    m = ExportManifest.load(out)
    assert m.quant.graph == "DequantizeLinear" and m.opset == 21 and m.weight_format == "int4"
    nodes, proto = _dq_nodes(out)
    assert len(nodes) == len(m.quant.tensors) - len(m.quant.row_tables) and not any(
        n.op_type == "MatMulNBits" for n in proto.graph.node
    )
    assert {o.version for o in proto.opset_import if o.domain == ""} == {21}
    onnx.checker.check_model(str(out / "decoder.onnx"))  # standard ONNX: no contrib op, functions at 21
    inits = {i.name: i for i in proto.graph.initializer}
    kinds = []
    for node in nodes:
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs == {"axis": 1, "block_size": 32} and len(node.input) == 2  # symmetric: no zero point
        codes, scales = inits[node.input[0]], inits[node.input[1]]
        kinds.append(codes.data_type)
        assert scales.data_type == onnx.TensorProto.FLOAT16
        assert list(scales.dims) == [codes.dims[0], codes.dims[1] // 32]
        scale_values = onnx.numpy_helper.to_array(scales, base_dir=str(out))
        assert (scale_values > 0).all()  # TensorRT refuses negative DequantizeLinear scales
    assert kinds.count(onnx.TensorProto.INT8) == 1  # the LM head
    assert kinds.count(onnx.TensorProto.INT4) == len(nodes) - 1


@pytest.mark.parametrize(
    "preset,fmt,block", [("tiny-e2b", "int4", 32), ("tiny-31b", "int4", 128), ("tiny-e2b", "int8", 32)]
)
def test_ort_runs_the_tensorrt_form_and_matches_the_fake_quant_reference(
    make_quant_export, preset, fmt, block
):
    """onnxruntime runs the fp16 DequantizeLinear graph unfused, so it checks the same codes and scales the
    engines get, at the fp16 tolerances, against the reference with fp16-rounded positive scales."""
    report = validate(make_quant_export(preset, fmt, block, dtype="fp16"), steps=STEPS, write=False)
    assert report.passed, report.failure_message()


def test_swapped_int4_nibbles_fail_the_gate_in_the_tensorrt_form(make_quant_export, corrupt):
    out = corrupt(make_quant_export("tiny-e2b", "int4", dtype="fp16"), onnx.TensorProto.INT4, swap_nibbles)
    assert not validate(out, steps=STEPS, write=False).passed


def _overrides(fmt: str, *roles: str) -> tuple[tuple[str, str], ...]:
    return tuple((role, fmt) for role in roles)


ATTN, MLP = ("attn_q", "attn_k", "attn_v", "attn_o"), ("mlp_gate", "mlp_up", "mlp_down")
# The gate on the presets the per-format tests above leave out, tiny-e4b (E4B's layer plan) and tiny-26b-a4b
# (MoE; its int4 b32 experts are tested above): each of {int4 b32, int4 b128, int8, fp8} is in one of their
# exports through --quant-override (and the LM head, int8 by default). One export per block size and graph form,
# not one per format: the exports are what costs time here.
MIXED = [
    ("tiny-e4b", QuantRequest("int4", 32, overrides=_overrides("int8", *MLP)), {("int4", 32), ("int8", 32)}),
    (
        "tiny-e4b",
        QuantRequest("fp8", 128, overrides=_overrides("int4", *ATTN)),
        {("fp8", 128), ("int4", 128), ("int8", 128)},
    ),
    (
        "tiny-26b-a4b",
        QuantRequest("fp8", 128, overrides=(*_overrides("int8", *MLP), ("moe_experts", "int4"))),
        {("fp8", 128), ("int8", 128), ("int4", 128)},
    ),
]


@pytest.mark.slow  # an export and a validation each
@pytest.mark.parametrize("preset,request_,formats", MIXED, ids=["e4b-b32", "e4b-b128", "26b-b128"])
def test_every_format_passes_the_gate_on_e4b_and_the_moe_preset(
    make_checkpoint, tmp_path, preset, request_, formats
):
    from gemma4_compile.export import export_checkpoint
    from gemma4_compile.quant.formats import role_of

    out = tmp_path / "export"
    export_checkpoint(make_checkpoint(preset), out, max_seq_len=128, quant=request_)
    quant = ExportManifest.load(out).quant
    matmuls = {
        (f, quant.block_of(f)) for n, f in quant.tensors.items() if role_of(n) not in ("embed", "ple_table")
    }
    assert matmuls == formats
    assert preset != "tiny-26b-a4b" or quant.roles["moe_experts"] == "int4"
    report = validate(out, steps=STEPS, write=False)
    assert report.passed, report.failure_message()
