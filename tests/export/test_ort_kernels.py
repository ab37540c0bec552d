"""Our onnxruntime CPU kernels (runners/ort_kernels): `gemma4_ort::MoEStep` in the MoE body's few-token branch
(ops/moe/body.py `step_kernel`) against the torch reference, on both sides of the branch's token limit; the
runner uses it on an fp32 MoE export with the same logits and greedy tokens as without it (the tiny MoE export's
transformers test, tests/export/test_moe_body.py, runs with it where it is built), and runs without it where the
library is missing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from kernel_support import assert_same_tokens, built, kernel_session
from onnx import TensorProto, helper

from gemma4_compile.model import ops
from gemma4_compile.ops.moe import body
from gemma4_compile.ops.onnx_domain import plugin_attributes
from gemma4_compile.runners import ort_kernels
from gemma4_compile.runners.ort import all_nodes

NAMES = ("x", "r", "s", "gu", "dn")


@pytest.fixture(scope="module")
def library() -> Path:
    return built()


def _inputs(T, H, I, E, seed=5):  # noqa: E741
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(T, H, generator=g),
        torch.randn(T, E, generator=g) * 3,
        torch.rand(E, generator=g) + 0.5,  # per_expert_scale away from 1
        torch.randn(E, 2 * I, H, generator=g) / 4,
        torch.randn(E, H, I, generator=g) / 4,
    )


def _run(library: Path, tensors, K: int, profile: Path | None = None) -> tuple[np.ndarray, set[str]]:
    """The export's MoE node with the kernel body: (y, op types onnxruntime ran)."""
    feeds = {n: t.numpy() for n, t in zip(NAMES, tensors)}
    node = helper.make_node("MoE", list(NAMES), ["y"], domain="gemma4", top_k=K, **plugin_attributes())
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape)) for n, a in feeds.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(feeds["x"].shape))],
    )
    opsets = [helper.make_opsetid(d, v) for d, v in (("", 20), ("gemma4", 1), (body.KERNEL_DOMAIN, 1))]
    fn = body.step_kernel(body.function(), body.STEP_MAX_TOKENS)
    model = helper.make_model(graph, opset_imports=opsets, functions=[fn], ir_version=10)
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    if profile:
        options.enable_profiling, options.profile_file_prefix = True, str(profile / "moe")
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    y = sess.run(None, feeds)[0]
    if not profile:
        return y, set()
    events = json.loads(Path(sess.end_profiling()).read_text())
    return y, {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e["args"]}


@pytest.mark.parametrize("T", [1, 3, body.STEP_MAX_TOKENS, body.STEP_MAX_TOKENS + 1, 40])
@pytest.mark.parametrize(("E", "K"), [(16, 4), (8, 1)])
def test_moe_step_matches_reference_on_both_sides_of_the_token_limit(library, T, E, K, tmp_path):
    tensors = _inputs(T, 32, 16, E)
    got, ran = _run(library, tensors, K, tmp_path)
    np.testing.assert_allclose(got, ops.moe_reference(*tensors, K).numpy(), rtol=1e-5, atol=1e-5)
    assert ("MoEStep" in ran) == (T <= body.STEP_MAX_TOKENS)  # the limit decides which branch ran
    assert ("Loop" in ran) == (T > body.STEP_MAX_TOKENS)


def test_a_wrong_top_k_is_detected(library):
    """The comparison can fail: the kernel at top-2 differs from the top-3 reference."""
    tensors = _inputs(3, 32, 16, 16)
    got, _ = _run(library, tensors, 2)
    assert np.abs(got - ops.moe_reference(*tensors, 3).numpy()).max() > 1e-2


def test_inconsistent_shapes_are_refused(library):
    x, r, s, gu, dn = (t.numpy() for t in _inputs(2, 32, 16, 8))
    node = helper.make_node("MoEStep", list(NAMES), ["y"], domain=body.KERNEL_DOMAIN, top_k=2)
    sess = kernel_session(library, node, dict.fromkeys(NAMES, TensorProto.FLOAT))
    with pytest.raises(Exception, match="MoEStep: inconsistent shapes"):
        sess.run(None, {"x": x, "r": r, "s": s, "gu": gu, "dn": dn[:, :, :8]})  # down's I halved


def test_the_runner_uses_the_kernel_with_the_same_tokens(library, make_export):
    """tiny-26B-A4B fp32: a ragged batch of two prompts past the sliding window, then one-token steps (the
    kernel's branch), against the same export run without the kernel."""
    from gemma4_compile.passes.share_shapes import shared_decoder
    from gemma4_compile.runners.ort import OrtRunner

    export = make_export("tiny-26b-a4b")
    with_kernel, without = OrtRunner(export, kernels=True), OrtRunner(export, kernels=False)
    assert with_kernel.kernels == "attention+moe_step" and without.kernels == "off"
    graph = onnx.load_from_string(shared_decoder(with_kernel.manifest.graph_path("decoder"), moe_step=True))
    assert any(n.op_type == "MoEStep" for n in all_nodes(graph.graph))
    assert_same_tokens(with_kernel, without)


def test_the_runner_runs_without_the_library(make_export, monkeypatch):
    from gemma4_compile.runners.ort import OrtRunner

    def missing() -> Path:
        raise ort_kernels.KernelsUnavailable("no C++ compiler (test)")

    monkeypatch.setattr(ort_kernels, "library", missing)
    runner = OrtRunner(make_export("tiny-26b-a4b"))
    assert runner.kernels == "unavailable: no C++ compiler (test)"
    state = runner.start(1, 8)
    assert np.isfinite(runner.step(state, np.array([[5, 6, 7]]), np.array([3]))).all()


def test_the_runner_names_the_moe_kernel_of_each_export_or_why_none(make_export):
    """The runner's report is about this export's graph: fp32 experts take MoEStep, 4-bit ones MoENBits; no MoE,
    or 8-bit experts (MatMulNBits), take none."""
    import dataclasses

    from gemma4_compile.export.manifest import ExportManifest
    from gemma4_compile.quant.formats import QuantSpec
    from gemma4_compile.runners.ort import _moe_kernel

    manifest = ExportManifest.load(make_export("tiny-26b-a4b"))
    assert _moe_kernel(manifest) == ("moe_step", "")
    dense = dataclasses.replace(manifest, spec=dataclasses.replace(manifest.spec, enable_moe_block=False))
    assert _moe_kernel(dense) == (None, "no MoE")
    int4 = dataclasses.replace(manifest, quant=QuantSpec("int4", 32, {"moe_experts": "int4"}))
    assert _moe_kernel(int4) == ("moe_nbits", "")
    int8 = dataclasses.replace(manifest, quant=QuantSpec("int8", 32, {"moe_experts": "int8"}))
    assert _moe_kernel(int8) == (None, "its 8-bit experts run as MatMulNBits")


def test_a_library_onnxruntime_cannot_load_leaves_the_bodies(make_export, monkeypatch, tmp_path):
    from gemma4_compile.runners.ort import OrtRunner

    broken = tmp_path / "libgemma4_ort-broken.so"
    broken.write_bytes(b"not a shared library")
    monkeypatch.setattr(ort_kernels, "library", lambda: broken)
    runner = OrtRunner(make_export("tiny-26b-a4b"))
    assert runner.kernels.startswith("unavailable: cannot load libgemma4_ort-broken.so")
    state = runner.start(1, 8)
    assert np.isfinite(runner.step(state, np.array([[5, 6, 7]]), np.array([3]))).all()


def test_a_compiler_that_does_not_run_is_a_one_line_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("GEMMA4_COMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(tmp_path))
    for name in ort_kernels.NEEDED:
        (tmp_path / name).write_text("// header\n")
    with pytest.raises(ort_kernels.KernelsUnavailable, match="cannot build the kernels"):
        ort_kernels.build()
