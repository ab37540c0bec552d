"""TensorRT-RTX and the `gemma4` Python plugins: which path the ONNX parser takes per node, and the CPU build.

The model follows docs/export-format.md (custom-domain nodes with plugin_namespace/plugin_version and the
exporter's model-local function bodies). Everything that touches TensorRT runs in a subprocess: the plugin
registry is process-wide, and RTX 1.7.1's parser kills its process when it cannot dlopen
`libtensorrt_rtx.so` (see rtx.py). This file is also the subprocess's script (`python THIS SCENARIO ...`).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gemma4_compile.plugins import rtx
from gemma4_compile.plugins.registration import ATTENTION, MOE, PluginError

trt = pytest.importorskip("tensorrt_rtx", reason="needs tensorrt_rtx (pip install .[rtx])")

pytestmark = pytest.mark.rtx

B, HQ, HKV, D, C, WINDOW, SCALE = "batch", 4, 2, 16, 4, 4, 0.5
H, E, INTER, TOP_K = 16, 4, 8, 2
RESULT = "RESULT "
ATTENTION_BUILTIN_ERROR = (
    "Assertion failed: node.output().size() == 1: TensorRT only supports Attention nodes with one output."
)


# ----- the ONNX model ---------------------------------------------------------------------------


def gemma4_model(
    ops_: tuple[str, ...] = ("SlidingWindowAttention", "MoE"),
    dtype: int = TensorProto.FLOAT,
    attention_op: str = "SlidingWindowAttention",
    window: onnx.AttributeProto | None = None,
    check: bool = True,
) -> onnx.ModelProto:
    """One gemma4::SlidingWindowAttention and/or one gemma4::MoE node, as export-format.md describes them."""
    from gemma4_compile.export.custom_ops import functions

    plugin = {"plugin_namespace": "gemma4", "plugin_version": "1"}
    act = lambda name, shape: helper.make_tensor_value_info(name, dtype, shape)  # noqa: E731
    nodes, inputs, outputs, inits = [], [], [], []
    if "SlidingWindowAttention" in ops_:
        node = helper.make_node(
            attention_op,
            ["q", "k", "v", "past_k", "past_v", "past_len", "seq_len"],
            ["out", "present_k", "present_v"],
            name="attn0",
            domain="gemma4",
            scale=SCALE,
            **plugin,
        )
        node.attribute.append(window or helper.make_attribute("window", WINDOW))
        nodes.append(node)
        inputs += [
            act("q", [B, HQ, "sequence", D]),
            act("k", [B, HKV, "sequence", D]),
            act("v", [B, HKV, "sequence", D]),
            act("past_k", [B, HKV, C, D]),
            act("past_v", [B, HKV, C, D]),
            helper.make_tensor_value_info("past_len", TensorProto.INT64, [B]),
            helper.make_tensor_value_info("seq_len", TensorProto.INT64, [B]),
        ]
        outputs += [
            act("out", [B, HQ, "sequence", D]),
            act("present_k", [B, HKV, C, D]),
            act("present_v", [B, HKV, C, D]),
        ]
    if "MoE" in ops_:
        nodes.append(
            helper.make_node(
                "MoE",
                ["x", "router_logits", "per_expert_scale", "gate_up", "down"],
                ["y"],
                name="moe0",
                domain="gemma4",
                top_k=TOP_K,
                **plugin,
            )
        )
        inputs += [act("x", ["tokens", H]), act("router_logits", ["tokens", E])]
        outputs.append(act("y", ["tokens", H]))
        rng = np.random.default_rng(0)
        np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        for name, shape in (
            ("per_expert_scale", (E,)),
            ("gate_up", (E, 2 * INTER, H)),
            ("down", (E, H, INTER)),
        ):
            inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np_dtype), name))
    bodies = functions(set(ops_))
    for fn in bodies:
        if fn.name == "SlidingWindowAttention":
            fn.name = attention_op
    model = helper.make_model(
        helper.make_graph(nodes, "gemma4_plugins", inputs, outputs, inits),
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("gemma4", 1)],
        functions=bodies,
    )
    model.ir_version = 10
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def custom_node_model(decoder_path: Path) -> onnx.ModelProto:
    """The gemma4 nodes of a real export, with their function bodies; every other tensor becomes an input."""
    model = onnx.load(decoder_path, load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == "gemma4"]
    typed = {v.name: v for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    typed.update(
        {i.name: helper.make_tensor_value_info(i.name, i.data_type, i.dims) for i in model.graph.initializer}
    )
    produced = {o for n in nodes for o in n.output}
    inputs = dict.fromkeys(i for n in nodes for i in n.input if i not in produced)
    outputs = dict.fromkeys(o for n in nodes for o in n.output)
    graph = helper.make_graph(nodes, "gemma4_nodes", [typed[i] for i in inputs], [typed[o] for o in outputs])
    sub = helper.make_model(graph, opset_imports=list(model.opset_import), functions=list(model.functions))
    sub.ir_version = model.ir_version
    onnx.checker.check_model(sub, full_check=True)
    return sub


# ----- subprocess side --------------------------------------------------------------------------


def _parse(model_path: str, register: bool, build: bool) -> dict:
    from gemma4_compile.plugins.registration import register_plugins

    if register:
        register_plugins(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(model_path)
    result = {
        "parsed": parsed,
        "errors": [parser.get_error(i).desc() for i in range(parser.num_errors)],
        "layer_types": sorted({network.get_layer(i).type.name for i in range(network.num_layers)}),
        "outputs": {
            t.name: [list(t.shape), t.dtype.name] for t in map(network.get_output, range(network.num_outputs))
        },
        "plugins": {},
    }
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.PLUGIN_V3:
            layer.__class__ = trt.IPluginV3Layer  # the binding returns the ILayer base
            plugin = layer.plugin
            result["plugins"][layer.name] = {
                "class": type(plugin).__name__,
                "values": plugin.values,
                "received": plugin.received,
            }
    if build and parsed:
        result.update(_build(builder, network))
    return result


def _build(builder, network) -> dict:
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)
        profile.set_shape(tensor.name, *([n if d == -1 else d for d in dims] for n in (1, 2, 4)))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    data = b"" if plan is None else bytes(plan)
    return {
        "plan_bytes": len(data),
        "plan_has": [s for s in ("gemma4", "window", "scale", "top_k") if s.encode() in data],
    }


def _parse_with_unguarded_creators(model_path: str) -> dict:
    """Register the creators without register()'s library check, then parse."""
    keep = rtx.creators(trt)
    registry = trt.get_plugin_registry()
    for creator in keep:
        registry.register_creator(creator, "gemma4")
    logger = trt.Logger(trt.Logger.WARNING)
    network = trt.Builder(logger).create_network(0)
    return {"parsed": trt.OnnxParser(network, logger).parse_from_file(model_path)}


def _child(argv: list[str]) -> None:
    scenario, model_path = argv[0], argv[1]
    if scenario == "parse":
        out = _parse(model_path, register=argv[2] == "1", build=argv[3] == "1")
    else:
        out = _parse_with_unguarded_creators(model_path)
    print(RESULT + json.dumps(out), flush=True)


# ----- test side --------------------------------------------------------------------------------


def run_child(
    tmp_path: Path, model: onnx.ModelProto, *args: str, alias: bool = True
) -> subprocess.CompletedProcess:
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    env = rtx.parser_library_env(tmp_path / "lib") if alias else _env_without_alias()
    return subprocess.run(
        [sys.executable, __file__, args[0], str(path), *args[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def child_result(proc: subprocess.CompletedProcess) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len(RESULT) :])


def _env_without_alias() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LD_LIBRARY_PATH", None)
    return env


def test_moe_without_plugins_inlines_its_function_and_builds_on_cpu(tmp_path):
    """With the static-shape body the engine build swaps in (engines/prepare.py; TensorRT-RTX has no NonZero)."""
    from gemma4_compile.ops.moe import body

    model = gemma4_model(("MoE",))
    i = next(i for i, f in enumerate(model.functions) if f.name == body.OP_TYPE)
    model.functions[i].CopyFrom(body.function(body.BODY_STATIC))
    result = child_result(run_child(tmp_path, model, "parse", "0", "1"))
    assert result["parsed"], result["errors"]
    assert "PLUGIN_V3" not in result["layer_types"]
    assert {"TOPK", "MATRIX_MULTIPLY", "SOFTMAX"} <= set(result["layer_types"])
    assert result["plan_bytes"] > 0


def test_an_op_named_attention_would_be_claimed_by_builtin_onnx_attention_importer(tmp_path):
    """Why the op is called SlidingWindowAttention: dispatch is by op_type, whatever the domain, so
    TensorRT's own ONNX `Attention` importer (opset 23) would beat the local function and reject the three
    outputs; the exported op_type (next test) inlines fine."""
    model = gemma4_model(("SlidingWindowAttention",), attention_op="Attention")
    result = child_result(run_child(tmp_path, model, "parse", "0", "0"))
    assert not result["parsed"]
    assert result["errors"] == [ATTENTION_BUILTIN_ERROR]


def test_attention_function_inlines_and_builds_under_the_exported_op_type(tmp_path):
    model = gemma4_model(("SlidingWindowAttention",))
    result = child_result(run_child(tmp_path, model, "parse", "0", "1"))
    assert result["parsed"], result["errors"]
    assert "PLUGIN_V3" not in result["layer_types"]
    assert {"SOFTMAX", "MATRIX_MULTIPLY", "SELECT"} <= set(result["layer_types"])
    assert result["plan_bytes"] > 0


def test_registered_plugins_take_both_nodes_with_int32_and_float32_fields(tmp_path):
    result = child_result(run_child(tmp_path, gemma4_model(), "parse", "1", "0"))
    assert result["parsed"], result["errors"]
    assert result["layer_types"] == ["CONSTANT", "PLUGIN_V3"]  # constants: the MoE weights
    assert result["outputs"] == {  # out like q, presents like the pasts, y like x (-1: dynamic)
        "out": [[-1, HQ, -1, D], "FLOAT"],
        "present_k": [[-1, HKV, C, D], "FLOAT"],
        "present_v": [[-1, HKV, C, D], "FLOAT"],
        "y": [[-1, H], "FLOAT"],
    }
    assert result["plugins"] == {
        "attn0": {
            "class": "Gemma4Plugin",
            "values": {"window": WINDOW, "scale": SCALE},
            "received": {"window": "INT32", "scale": "FLOAT32"},
        },
        "moe0": {"class": "Gemma4Plugin", "values": {"top_k": TOP_K}, "received": {"top_k": "INT32"}},
    }


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16], ids=["fp32", "fp16"])
def test_cpu_build_with_python_plugins_serializes_their_fields(tmp_path, dtype):
    result = child_result(run_child(tmp_path, gemma4_model(dtype=dtype), "parse", "1", "1"))
    assert result["parsed"], result["errors"]
    assert result["plan_bytes"] > 0
    assert result["plan_has"] == ["gemma4", "window", "scale", "top_k"]
    assert {dtype for _, dtype in result["outputs"].values()} == {
        "FLOAT" if dtype == TensorProto.FLOAT else "HALF"
    }


@pytest.mark.slow
def test_real_export_custom_nodes_become_plugins_and_build(tmp_path, make_export):
    """The exporter's own gemma4 nodes (tiny 26B-A4B: sliding and global attention, MoE) take the plugin
    path with the attributes export.json lists, and the CPU build succeeds."""
    export = make_export("tiny-26b-a4b")
    manifest = json.loads((export / "export.json").read_text())
    model = custom_node_model(export / manifest["graphs"]["decoder"]["file"])
    result = child_result(run_child(tmp_path, model, "parse", "1", "1"))
    assert result["parsed"], result["errors"]
    assert result["layer_types"] == ["PLUGIN_V3"]
    expected = {
        n["name"]: {k: v for k, v in n["attributes"].items() if not k.startswith("plugin_")}
        for n in manifest["custom_nodes"]
    }
    assert {name: p["values"] for name, p in result["plugins"].items()} == expected
    assert {n["op_type"] for n in manifest["custom_nodes"]} == {"SlidingWindowAttention", "MoE"}
    assert result["plan_bytes"] > 0


def test_wrongly_typed_attribute_is_refused_by_the_creator(tmp_path):
    model = gemma4_model(
        ("SlidingWindowAttention",), window=helper.make_attribute("window", 4.0), check=False
    )
    proc = run_child(tmp_path, model, "parse", "1", "0")
    result = child_result(proc)
    assert not result["parsed"]
    assert "field 'window' must be one INT32, got FLOAT32" in proc.stderr
    assert result["errors"] == ["Assertion failed: plugin: Could not create the plugin."]


def test_parser_without_library_alias_terminates_the_process(tmp_path):
    """The RTX 1.7.1 bug that `rtx.register` guards against, reproduced with unguarded creators."""
    loaded = _loaded_library_path()
    if (loaded.parent / rtx.PARSER_LIBRARY).exists():
        pytest.skip(f"{loaded.parent} already has {rtx.PARSER_LIBRARY}: the parser cannot fail there")
    proc = run_child(tmp_path, gemma4_model(("MoE",)), "unguarded", alias=False)
    assert proc.returncode == -6, proc.stderr[-2000:]  # SIGABRT
    assert "terminate called without an active exception" in proc.stderr


def _loaded_library_path() -> Path:
    loaded = rtx.loaded_library()
    assert loaded is not None
    return loaded


# ----- pure parts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "pos", "type_name", "first", "linear", "ok"),
    [
        (ATTENTION, 0, "BF16", "BF16", True, True),
        (ATTENTION, 0, "INT8", "INT8", True, False),
        (ATTENTION, 0, "FLOAT", "FLOAT", False, False),  # CHW32 and friends
        (ATTENTION, 3, "HALF", "HALF", True, True),
        (ATTENTION, 3, "FLOAT", "HALF", True, False),  # past_k must match q
        (ATTENTION, 5, "INT64", "HALF", True, True),  # past_len
        (ATTENTION, 6, "INT32", "HALF", True, False),  # seq_len must stay int64
        (ATTENTION, 7, "HALF", "HALF", True, True),  # out
        (MOE, 4, "FLOAT", "FLOAT", True, True),  # down
        (MOE, 5, "HALF", "FLOAT", True, False),  # y must match x
    ],
)
def test_supported_formats(spec, pos, type_name, first, linear, ok):
    assert rtx.supports(spec, pos, type_name, first, linear) is ok


@pytest.mark.parametrize(
    ("pos", "type_name", "ok"),
    [(7, "INT64", True), (7, "HALF", False), (8, "HALF", True), (8, "INT64", False), (10, "HALF", True)],
)
def test_supported_formats_of_the_8_input_attention(pos, type_name, ok):
    """block_ids (port 7) is int64; the outputs move one port up."""
    assert rtx.supports(ATTENTION, pos, type_name, "HALF", True, num_inputs=8) is ok


def test_an_input_count_the_op_cannot_have_is_a_plugin_error():
    with pytest.raises(PluginError, match=r"SlidingWindowAttention: a node has 7 to 8 inputs, got 9"):
        ATTENTION.plugin_inputs(9)
    assert [p.name for p in ATTENTION.plugin_inputs(8)][-1] == "block_ids"


def test_rtx_type_names_are_trt_datatypes():
    assert {*rtx.ACTIVATION_TYPES, "INT64"} <= set(trt.DataType.__members__)


# torch is imported inside the CPU tests only, so the TensorRT subprocesses start fast.


def _attention_inputs():
    import torch

    dtype = torch.float32
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, HQ, 3, D, generator=g, dtype=dtype)
    k, v = (torch.randn(2, HKV, 3, D, generator=g, dtype=dtype) for _ in range(2))
    past_k, past_v = (torch.randn(2, HKV, C, D, generator=g, dtype=dtype) for _ in range(2))
    return [q, k, v, past_k, past_v, torch.tensor([5, 0]), torch.tensor([3, 2])]


def test_run_op_feeds_inputs_and_fields_in_contract_order_and_fills_outputs():
    import torch

    from gemma4_compile.model import ops

    inputs = _attention_inputs()
    outputs = [torch.empty_like(inputs[i]) for i in ATTENTION.output_like]
    rtx.run_op(ATTENTION, {"window": WINDOW, "scale": SCALE}, inputs, outputs, impl=ops.attention_reference)
    expected = ops.attention_reference(*inputs, window=WINDOW, scale=SCALE)
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want)

    g = torch.Generator().manual_seed(1)
    moe_in = [
        torch.randn(5, H, generator=g),
        torch.randn(5, E, generator=g),
        torch.rand(E, generator=g),
        torch.randn(E, 2 * INTER, H, generator=g),
        torch.randn(E, H, INTER, generator=g),
    ]
    y = torch.empty(5, H)
    rtx.run_op(MOE, {"top_k": TOP_K}, moe_in, [y], impl=ops.moe_reference)
    torch.testing.assert_close(y, ops.moe_reference(*moe_in, top_k=TOP_K))


def test_run_op_hands_block_ids_to_the_triton_kernel_by_name():
    """The 8-input node's enqueue path on the kernel itself (CPU interpreter): block_ids reaches the kernel,
    which matches the reference with the same ids and differs from it without them."""
    import torch

    from gemma4_compile.model import ops

    q, k, v, past_k, past_v, _, _ = _attention_inputs()
    past_len, seq_len = torch.tensor([0, 2]), torch.tensor([3, 3])
    block_ids = torch.tensor([[0, 0, 0], [-1, 1, 1]])
    inputs = [q, k, v, past_k, past_v, past_len, seq_len, block_ids]
    outputs = [torch.empty_like(inputs[i]) for i in ATTENTION.output_like]
    values = {"window": WINDOW, "scale": SCALE}
    rtx.run_op(ATTENTION, values, inputs, outputs)
    want = ops.attention_reference(*inputs[:7], **values, block_ids=block_ids)
    for got, expected in zip(outputs, want):
        torch.testing.assert_close(got, expected, atol=5e-6, rtol=5e-6)
    causal = ops.attention_reference(*inputs[:7], **values)[0]
    assert (outputs[0] - causal).abs().amax() > 1e-3


def test_run_op_rejects_a_kernel_with_the_wrong_output_count():
    with pytest.raises(PluginError, match="kernel returned 1 tensors, expected 3"):
        rtx.run_op(
            ATTENTION, {"window": 0, "scale": 1.0}, _attention_inputs(), [None] * 3, impl=lambda *a, **k: a[0]
        )


@pytest.mark.parametrize("spec", [ATTENTION, MOE], ids=lambda s: s.op_type)
def test_triton_wrappers_take_the_plugin_inputs_and_fields(spec):
    """enqueue calls kernels.<op>.<op>(*inputs, **fields): the wrapper's parameters must match the spec."""
    wrapper = rtx.kernel_impl(spec.op_type)
    names = list(inspect.signature(wrapper).parameters)
    expected = [*(p.name for p in spec.plugin_inputs()), *(f.name for f in spec.fields)]
    assert names[: len(expected)] == expected
    optional = [p.name for p in spec.plugin_inputs(len(spec.inputs))[len(spec.plugin_inputs()) :]]
    assert set(optional) <= set(names[len(expected) :])  # the optional inputs go by name


if __name__ == "__main__":
    _child(sys.argv[1:])
