"""The exported ONNX files: parity with transformers through onnxruntime, manifest, determinism, errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from gemma4_compile.errors import CheckpointError, ExportError, SpecError
from gemma4_compile.export import ExportManifest, export_checkpoint, export_spec
from gemma4_compile.export import exporter as exporter_module
from gemma4_compile.model.config import Gemma4Spec
from gemma4_compile.model.presets import PRESETS
from gemma4_compile.runners.ort import OrtRunner
from gemma4_compile.validate.reference import HFRunner

FP32_ATOL = 1e-4


def _prompt(spec, length, seed=0, batch=1):
    return np.random.default_rng(seed).integers(3, spec.vocab_size, (batch, length))


@pytest.fixture(scope="module")
def pair(make_export, make_checkpoint):
    cache = {}

    def get(preset):
        if preset not in cache:
            cache[preset] = OrtRunner(make_export(preset)), HFRunner(make_checkpoint(preset))
        return cache[preset]

    return get


@pytest.mark.slow
def test_ort_logits_match_transformers_over_three_windows(pair, tiny_preset):
    ort_runner, hf = pair(tiny_preset)
    W = ort_runner.spec.sliding_window
    ids = _prompt(ort_runner.spec, 3 * W + 5, batch=2)
    lengths = np.array([3 * W + 5, 2 * W + 1])
    a, b = ort_runner.logits(ids, lengths), hf.logits(ids, lengths)
    for row, n in enumerate(lengths):
        assert np.abs(a[row, :n] - b[row, :n]).max() <= FP32_ATOL


def test_ort_greedy_decode_matches_and_sliding_caches_stay_w(pair, tiny_preset):
    ort_runner, hf = pair(tiny_preset)
    spec = ort_runner.spec
    W = spec.sliding_window
    ids = _prompt(spec, W + 2, seed=5)
    steps = 2 * W + 3
    state = ort_runner.start(1, ids.shape[1] + steps)
    last = ort_runner.step(state, ids, np.array([ids.shape[1]]))[:, -1]
    tokens = []
    for _ in range(steps):
        tokens.append(int(last.argmax()))
        last = ort_runner.step(state, np.array([[tokens[-1]]]), np.array([1]))[:, -1]
        for c in ort_runner.manifest.caches:  # the ring never grows
            slots = state.caches[c.past[0]].shape[2]
            assert slots == (W if c.kind == "sliding" else ids.shape[1] + steps)
    np.testing.assert_array_equal(np.array([tokens]), hf.generate(ids, steps))


def test_manifest_describes_graphs_caches_and_files(make_export):
    path = make_export("tiny-e2b")
    m = ExportManifest.load(path)
    spec = PRESETS["tiny-e2b"]
    assert [c.layer for c in m.caches] == [p.index for p in spec.cache_layers]
    producer = {c.layer: c for c in m.caches}
    assert producer[3].kind == "sliding" and producer[3].consumers == [5, 6, 7, 8]
    assert producer[4].kind == "global" and producer[4].consumers == [9]
    names = [t.name for t in m.graphs["decoder"].inputs]
    assert names[:4] == ["inputs_embeds", "per_layer_tokens", "past_len", "seq_len"]
    assert "past_key_values.5.key" not in names  # consumers own no cache
    assert m.graphs["decoder"].input("past_key_values.0.key").shape == ("batch", 1, "sliding_cache_len", 16)
    assert m.graphs["decoder"].input("past_key_values.4.key").shape == ("batch", 1, "cache_len", 32)
    assert [n["op_type"] for n in m.custom_nodes].count("SlidingWindowAttention") == spec.num_hidden_layers
    assert all(n["attributes"]["plugin_namespace"] == "gemma4" for n in m.custom_nodes)
    from gemma4_compile.fsutil import sha256_file

    assert all(sha256_file(path / f) == h for f, h in m.files.items())
    loaded = onnx.load(str(path / "decoder.onnx"), load_external_data=False)
    assert {f.name for f in loaded.functions} == {"SlidingWindowAttention"}
    onnx.checker.check_model(str(path / "decoder.onnx"), full_check=True)


def test_moe_export_has_one_moe_node_per_layer(make_export):
    m = ExportManifest.load(make_export("tiny-26b-a4b"))
    moe = [n for n in m.custom_nodes if n["op_type"] == "MoE"]
    assert [n["layer"] for n in moe] == list(range(6)) and all(n["attributes"]["top_k"] == 2 for n in moe)


@pytest.mark.slow
def test_reexport_is_byte_identical(make_export, make_checkpoint, tmp_path):
    first = make_export("tiny-31b")
    second = export_checkpoint(make_checkpoint("tiny-31b"), tmp_path / "again", max_seq_len=256).path
    for name in ("embed.onnx", "decoder.onnx", "weights.data"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


@pytest.mark.slow
def test_bf16_graph_keeps_norms_softmax_and_softcap_in_fp32(make_checkpoint, tmp_path):
    path = export_checkpoint(
        make_checkpoint("tiny-26b-a4b", torch.bfloat16), tmp_path / "bf16", dtype="bf16"
    ).path
    model = ir.load(path / "decoder.onnx")
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT  # logits
    assert model.graph.inputs[0].dtype == ir.DataType.BFLOAT16
    for node in model.graph:
        if node.op_type in ("ReduceMean", "Pow", "Tanh"):  # RMSNorm statistics and the final soft-cap
            assert node.inputs[0].dtype == ir.DataType.FLOAT, node.name
    assert ExportManifest.load(path).dtype == "bf16"


# ----- bad input ------------------------------------------------------------------------------------


def _no_leftovers(parent: Path):
    assert not list(parent.glob("**/export.json")) and not list(parent.glob(".*tmp*"))


def test_missing_checkpoint_files(tmp_path):
    (tmp_path / "ck").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        export_checkpoint(tmp_path / "ck", tmp_path / "out")
    (tmp_path / "ck/config.json").write_text(json.dumps(PRESETS["tiny-31b"].to_hf_config()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        export_checkpoint(tmp_path / "ck", tmp_path / "out")
    _no_leftovers(tmp_path)


def test_config_weights_mismatch(make_checkpoint, tmp_path):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(make_checkpoint("tiny-31b"), ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight' .* shape \[\d+, \d+\], config expects"
    ):
        export_checkpoint(ck, tmp_path / "out")
    cfg["text_config"]["intermediate_size"] = "wide"
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecError, match="'intermediate_size'"):
        export_checkpoint(ck, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_unsupported_dtype_and_existing_output(make_checkpoint, make_export, tmp_path):
    with pytest.raises(ExportError, match="unsupported dtype 'int8'"):
        export_checkpoint(make_checkpoint("tiny-31b"), tmp_path / "out", dtype="int8")
    with pytest.raises(ExportError, match="already exists.*--force"):
        export_checkpoint(make_checkpoint("tiny-31b"), make_export("tiny-31b"))


def test_unwritable_output(make_checkpoint, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ExportError, match="which is a file; give a directory"):
        export_checkpoint(make_checkpoint("tiny-31b"), blocker / "out")


def test_failure_midway_leaves_no_export(make_checkpoint, tmp_path, monkeypatch):
    """A full disk while writing weights: one error, no export.json, no temp folder."""

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exporter_module, "write_weight_file", disk_full)
    with pytest.raises(ExportError, match="No space left on device"):
        export_checkpoint(make_checkpoint("tiny-31b"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["26b-a4b", "31b"])
def test_full_size_structures_export_on_the_meta_device(preset, tmp_path):
    """Graph only: the real 26B/31B layers trace without materializing a single weight. Two periods of the
    layer pattern (12 layers; every width, head count and expert count real): the depth only repeats them,
    and tracing all 30/60 layers cost CI 6 minutes."""
    text = PRESETS[preset].to_hf_text_config()
    text.update(num_hidden_layers=12, layer_types=text["layer_types"][:12])
    spec = Gemma4Spec.from_hf_dict({"model_type": "gemma4", "text_config": text})
    assert (
        dataclasses.replace(
            spec, num_hidden_layers=PRESETS[preset].num_hidden_layers, layer_types=PRESETS[preset].layer_types
        )
        == PRESETS[preset]
    )
    m = export_spec(spec, tmp_path / preset, dtype="bf16").manifest
    assert not m.weights and len(m.caches) == spec.num_hidden_layers
    assert m.graphs["decoder"].input("past_key_values.5.key").shape == (
        "batch",
        spec.num_global_key_value_heads,
        "cache_len",
        512,
    )
    assert (tmp_path / preset / "decoder.onnx").stat().st_size < 50 * 2**20
