"""The MoE as seven AOT plugin stages (full TensorRT): the graph split, and the stage plugins' shapes and launches.

Full TensorRT is not installable here (docs/tensorrt.md, what installs where), so `tensorrt.plugin` is replaced by `Recorder`,
which only records what the decorators receive and applies the signature rules QDP documents (TensorDescs first,
int32 array fields, `outputs`/`tactic` last, a 4-tuple aot_impl return). The launches the recorded aot_impls
describe (kernel, grid, int32 scalars, with the constexprs they compiled) then run on the Triton interpreter in
graph order and are compared with the torch reference op. Not shown here: TensorRT's own parsing and the PTX
launch on a GPU (test_qdp.py's full-TensorRT tests, skipped without it).
"""

from __future__ import annotations

import importlib
import inspect
import os
import typing
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("triton", reason="the plugin kernels are Triton kernels")

from gemma4_compile.errors import BuildError
from gemma4_compile.model import ops
from gemma4_compile.passes import MarkAot, SplitMoE, plugin_lookup, run_on_proto
from gemma4_compile.plugins import aot, qdp
from gemma4_compile.plugins import moe_stages as ms
from gemma4_compile.plugins.kernels import moe as M

pytestmark = pytest.mark.kernel

TRT_NAMES = {torch.float32: "FLOAT", torch.float16: "HALF", torch.bfloat16: "BF16", torch.int32: "INT32"}
TORCH = {v: k for k, v in TRT_NAMES.items()}


class DataType:
    def __init__(self, name: str):
        self.name = name


DATA_TYPES = {name: DataType(name) for name in TORCH}
FAKE_TRT = SimpleNamespace(__name__="tensorrt", float32=DATA_TYPES["FLOAT"], int32=DATA_TYPES["INT32"])


class TensorDesc:
    def __init__(self, shape_expr: tuple, dtype: DataType):
        self.shape_expr, self.dtype = tuple(shape_expr), dtype


class Recorder:
    """Records `tensorrt.plugin` definitions; refuses what QDP's own validation refuses."""

    TensorDesc = TensorDesc

    class AutoTuneCombination:
        def __init__(self, types: str):
            self.types = types

    class KernelLaunchParams:
        grid_x = grid_y = grid_z = block_x = shared_mem = None

    class SymInt32:
        def __init__(self, value):
            self.value = value

    class SymIntExprs(list):
        @classmethod
        def from_tuple(cls, values):
            return cls(values)

    def __init__(self):
        self.defs: dict[tuple[str, str], typing.Callable] = {}
        self.op = SimpleNamespace()

    @staticmethod
    def from_shape_expr(shape, dtype):
        return TensorDesc(shape, dtype)

    def _define(self, kind: str, plugin_id: str, check):
        def deco(fn):
            assert (plugin_id, kind) not in self.defs, f"QDP refuses a second {kind} for {plugin_id}"
            check(plugin_id, inspect.signature(fn))
            self.defs[(plugin_id, kind)] = fn
            namespace, name = plugin_id.split("::")
            if not hasattr(self.op, namespace):
                setattr(self.op, namespace, SimpleNamespace())
            setattr(getattr(self.op, namespace), name, fn)
            return fn

        return deco

    def _check_register(self, plugin_id, sig):
        params = list(sig.parameters.values())
        kinds = ["tensor" if p.annotation is TensorDesc else "attr" for p in params]
        assert kinds == sorted(kinds, key=lambda k: k != "tensor"), f"{plugin_id}: tensors must come first"
        for p in params:
            assert p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty and p.annotation is not p.empty
            if p.annotation is not TensorDesc:
                assert p.name not in ("outputs", "stream", "tactic")
                assert typing.get_args(typing.get_args(p.annotation)[1])[0] in (np.int32, np.float32), p
        ret = sig.return_annotation
        assert ret is TensorDesc or all(a is TensorDesc for a in typing.get_args(ret))

    def _check_aot(self, plugin_id, sig):
        register = inspect.signature(self.defs[(plugin_id, "register")])
        assert list(sig.parameters) == [*register.parameters, "outputs", "tactic"]
        assert len(typing.get_args(sig.return_annotation)) == 4

    def register(self, plugin_id):
        return self._define("register", plugin_id, self._check_register)

    def autotune(self, plugin_id):
        return self._define("autotune", plugin_id, lambda *_: None)

    def aot_impl(self, plugin_id):
        return self._define("aot_impl", plugin_id, self._check_aot)


@pytest.fixture
def recorder(monkeypatch):
    """register_qdp against the Recorder; compile_kernel records (kernel, dtype, constexprs) instead of PTX."""
    rec = Recorder()
    rec.compiled = {}

    def compile_kernel(kernel, target, dtype, constexprs, warps, stages, cache_dir):
        entry = f"{kernel}_{len(rec.compiled)}"
        rec.compiled[entry] = (kernel, dtype, dict(constexprs))
        return SimpleNamespace(entry=entry, threads=32 * warps, shared_bytes=0), ""

    monkeypatch.setattr(qdp, "qdp_module", lambda trt: rec)
    monkeypatch.setattr(qdp, "compile_kernel", compile_kernel)
    assert qdp.register_qdp(FAKE_TRT, "sm90") == qdp.plugin_ids()
    return rec


def _moe_graph(T: int, H: int, E: int, inter: int, top_k: int, seed: int = 6):
    """One `gemma4::MoE` node, weights as initializers (as the exporter writes them), and its inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    logits = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]).float() / 8  # no top-k ties
    scale = torch.rand(E, generator=g) + 0.5
    gate_up, down = torch.randn(E, 2 * inter, H, generator=g) / 8, torch.randn(E, H, inter, generator=g) / 6
    weights = {"scale": scale, "gate_up": gate_up, "down": down}
    f = TensorProto.FLOAT
    node = helper.make_node(
        "MoE",
        ["x", "logits", "scale", "gate_up", "down"],
        ["y"],
        name="layers.0/moe",
        domain="gemma4",
        top_k=top_k,
        plugin_namespace="gemma4",
        plugin_version="1",
    )
    graph = helper.make_graph(
        [node],
        "moe",
        [
            helper.make_tensor_value_info("x", f, ["T", H]),
            helper.make_tensor_value_info("logits", f, ["T", E]),
        ],
        [helper.make_tensor_value_info("y", f, ["T", H])],
        [numpy_helper.from_array(t.numpy(), name) for name, t in weights.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("gemma4", 1)]
    )
    return model, {"x": x, "logits": logits, **weights}


def _run_as_trt_would(model: onnx.ModelProto, tensors: dict, rec: Recorder) -> dict:
    """Each stage node: register -> output descs -> buffers; aot_impl -> one launch on the interpreter."""
    for node in model.graph.node:
        pid = f"{node.domain}::{node.op_type}"
        fields = {a.name: np.array([a.i], np.int32) for a in node.attribute if a.name in ms.FIELDS}
        descs = [TensorDesc(tensors[n].shape, DATA_TYPES[TRT_NAMES[tensors[n].dtype]]) for n in node.input]
        outs = rec.defs[(pid, "register")](*descs, **fields)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for name, desc in zip(node.output, outs, strict=True):
            tensors[name] = torch.full(
                tuple(desc.shape_expr), -7, dtype=TORCH[desc.dtype.name]
            )  # no zeros to lean on
        entry, _, params, scalars = rec.defs[(pid, "aot_impl")](*descs, **fields, outputs=outs, tactic=0)
        kernel, _, constexprs = rec.compiled[entry]
        spec = aot.KERNELS[kernel]
        fn = getattr(importlib.import_module(spec.module), spec.fn)
        args = (
            [tensors[n] for n in node.input]
            + [int(s.value) for s in scalars]
            + [tensors[n] for n in node.output]
        )
        fn[(params.grid_x, params.grid_y, params.grid_z)](*args, **constexprs)
    return tensors


# ----- the split ----------------------------------------------------------------------------------------


def split_moe(model: onnx.ModelProto, tokens_hint: int = 1, num_experts: int | None = None) -> int:
    """The engine builder's SplitMoE pass on a proto, in place; -> how many MoE nodes it split."""
    split = SplitMoE(tokens_hint, num_experts)
    run_on_proto(model, [split])
    return split.split


def mark_aot(model: onnx.ModelProto, creators: set[tuple[str, str, str]]) -> int:
    mark = MarkAot(plugin_lookup(creators))
    run_on_proto(model, [mark])
    return mark.marked


def test_split_replaces_moe_by_seven_stages_wired_through_the_kernel_buffers():
    model, _ = _moe_graph(T=5, H=64, E=16, inter=32, top_k=4)
    assert split_moe(model, tokens_hint=4096) == 1
    nodes = list(model.graph.node)
    assert [n.op_type for n in nodes] == [s.op_type for s in ms.STAGES]
    produced = {"x", "logits", "scale", "gate_up", "down"}
    for node, stage in zip(nodes, ms.STAGES, strict=True):
        assert set(node.input) <= produced, f"{node.name} reads a tensor no earlier node wrote"
        produced |= set(node.output)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {
            "top_k": 4,
            "num_experts": 16,
            "rows_per_expert": 1024,
            "plugin_namespace": b"gemma4",
            "plugin_version": b"1",
            "aot": 1,
        }
        assert len(node.input) == len(ms.stage_io(stage)[0]) and node.domain == "gemma4"
    assert nodes[-1].output == ["y"] and nodes[0].input == ["logits", "scale"]
    assert split_moe(model) == 0  # nothing left to split


def test_split_needs_the_expert_count():
    model, _ = _moe_graph(T=3, H=64, E=8, inter=32, top_k=2)
    del model.graph.initializer[:]
    with pytest.raises(BuildError, match="MoE node 'layers.0/moe': cannot tell the number of experts"):
        split_moe(model)
    assert split_moe(model, num_experts=8) == 1


def test_exported_moe_layers_split_into_stages(make_export):
    from gemma4_compile.export.manifest import ExportManifest

    manifest = ExportManifest.load(make_export("tiny-26b-a4b"))
    model = onnx.load(str(manifest.graph_path("decoder")), load_external_data=False)
    fused = sum(n.op_type == "MoE" for n in model.graph.node)
    assert fused == manifest.spec.num_hidden_layers
    assert split_moe(model) == fused
    counts = {s.op_type: sum(n.op_type == s.op_type for n in model.graph.node) for s in ms.STAGES}
    assert set(counts.values()) == {fused}
    experts = {
        a.i
        for n in model.graph.node
        if n.op_type == "MoERoute"
        for a in n.attribute
        if a.name == "num_experts"
    }
    assert experts == {manifest.spec.num_experts}


def test_only_registered_stage_creators_trigger_the_split():
    creators = {(s.op_type, "1", "gemma4") for s in ms.STAGES}
    assert ms.stages_registered(creators)
    assert not ms.stages_registered(creators - {("MoECombine", "1", "gemma4")})
    assert not ms.stages_registered({("MoE", "1", "gemma4")})  # TensorRT-RTX: the fused Python plugin


def test_full_tensorrt_build_marks_plugin_nodes_aot():
    """The ONNX parser takes a QDP's AOT implementation only for nodes with aot=1 (TensorRT's QDP sample)."""
    model, _ = _moe_graph(T=3, H=64, E=8, inter=32, top_k=2)
    attention = helper.make_node(
        "SlidingWindowAttention",
        ["q"],
        ["o"],
        name="attn",
        domain="gemma4",
        window=4,
        plugin_namespace="gemma4",
        plugin_version="1",
    )
    model.graph.node.extend([attention, helper.make_node("Relu", ["o"], ["r"], name="relu")])
    creators = {(s.op_type, "1", "gemma4") for s in ms.STAGES} | {("SlidingWindowAttention", "1", "gemma4")}
    assert mark_aot(model, creators) == 1  # the fused MoE has no QDP, Relu is standard: only attention
    split_moe(model)
    assert mark_aot(model, creators) == 8  # attention (already marked) + the seven stages, which carry aot=1
    for node in model.graph.node:
        aot = [a.i for a in node.attribute if a.name == "aot"]
        assert aot == ([] if node.op_type == "Relu" else [1]), node.name


# ----- the stage plugins --------------------------------------------------------------------------------


def test_stage_dims_come_from_each_stages_own_tensors():
    fields = {"top_k": 8, "num_experts": 128, "rows_per_expert": 1}
    assert ms.stage_dims({"Logits_ptr": (7, 128), "Scale_ptr": (128,)}, fields) == {
        "K": 8,
        "E": 128,
        "BE": 128,
        "T": 7,
        "N": 56,
        "NB": 1,
    }
    down = ms.stage_dims({"H_ptr": (300, 704), "Down_ptr": (128, 2816, 704)}, fields)
    assert (down["N"], down["T"], down["H"], down["I"], down["NB"]) == (300, 37, 2816, 704, 3)
    assert ms.stage_dims({"BlockCounts_ptr": (3, 128)}, {**fields, "num_experts": 100})["BE"] == 128


def test_every_stage_plugin_follows_the_kernel_signature(recorder):
    for stage in ms.STAGES:
        inputs, outputs = ms.stage_io(stage)
        sig = inspect.signature(recorder.defs[(stage.plugin_id, "aot_impl")])
        assert list(sig.parameters) == [*map(ms.arg_name, inputs), *ms.FIELDS, "outputs", "tactic"]
        (combo,) = recorder.defs[(stage.plugin_id, "autotune")]()
        assert len(combo.types.split(", ")) == len(inputs) + len(outputs)
    assert ms.arg_name("SortedPairs_ptr") == "sorted_pairs" and ms.arg_name("X_ptr") == "x"


def test_register_qdp_is_idempotent(recorder):
    assert qdp.register_qdp(FAKE_TRT, "sm90") == qdp.plugin_ids()  # the Recorder refuses a second definition


@pytest.mark.parametrize(
    ("T", "E", "top_k", "tokens_hint"), [(9, 16, 4, 9), (1, 8, 1, 1), (40, 128, 8, 4096)]
)
def test_stage_plugins_launched_in_graph_order_reproduce_the_reference(recorder, T, E, top_k, tokens_hint):
    """Decode (one token), a small batch, and prefill-sized tiles over 128 experts (BLOCK_M 64)."""
    H, inter = 64, 32
    model, tensors = _moe_graph(T, H, E, inter, top_k)
    split_moe(model, tokens_hint=tokens_hint)
    out = _run_as_trt_would(model, tensors, recorder)
    want = ops.moe_reference(
        tensors["x"], tensors["logits"], tensors["scale"], tensors["gate_up"], tensors["down"], top_k
    )
    torch.testing.assert_close(out["y"], want, atol=5e-6, rtol=5e-6)  # fp32: only the summation order differs
    block_m = {c["BLOCK_M"] for k, _, c in recorder.compiled.values() if k in ("moe_offsets", "moe_gate_up")}
    assert len(block_m) == 1, "offsets and the GEMMs must cut rows in the same tiles"


def test_route_stage_compiles_for_the_activation_dtype(recorder):
    fields = {
        f: np.array([v], np.int32) for f, v in (("top_k", 2), ("num_experts", 8), ("rows_per_expert", 1))
    }
    logits, scale = TensorDesc((4, 8), DATA_TYPES["BF16"]), TensorDesc((8,), DATA_TYPES["BF16"])
    outs = recorder.defs[("gemma4::MoERoute", "register")](logits, scale, **fields)
    assert [(o.shape_expr, o.dtype.name) for o in outs] == [((4, 2), "FLOAT"), ((4, 2), "INT32")]
    entry, *_ = recorder.defs[("gemma4::MoERoute", "aot_impl")](
        logits, scale, **fields, outputs=outs, tactic=0
    )
    assert recorder.compiled[entry][:2] == ("moe_route", "bf16")


def test_sort_stage_compiles_dtype_free(recorder):
    fields = {
        "top_k": np.array([2], np.int32),
        "num_experts": np.array([8], np.int32),
        "rows_per_expert": np.array([1], np.int32),
    }
    ids = TensorDesc((4, 2), DATA_TYPES["INT32"])
    (counts,) = [recorder.defs[("gemma4::MoECount", "register")](ids, **fields)]
    assert counts.shape_expr == (1, 8) and counts.dtype.name == "INT32"
    entry, _, params, scalars = recorder.defs[("gemma4::MoECount", "aot_impl")](
        ids, **fields, outputs=(counts,), tactic=0
    )
    assert recorder.compiled[entry][:2] == ("moe_count", "i32")
    assert (params.grid_x, params.grid_y, params.grid_z) == (1, 1, 1) and [s.value for s in scalars] == [8]
    assert recorder.compiled[entry][2]["BLOCK_P"] == M.BLOCK_P
