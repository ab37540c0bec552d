"""export.json: one loader (strict and lenient), typed graphs and caches, the cache-size rule, two precision
fields; and DType, the one dtype name table."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from gemma4_compile.dtypes import DType, weight_format_for
from gemma4_compile.errors import ExportError, Gemma4CompileError
from gemma4_compile.export.manifest import DECODER, EMBED, CacheSpec, ExportManifest, cache_spec
from gemma4_compile.model.presets import PRESETS


@pytest.fixture(scope="module")
def e2b_export(make_export):
    return make_export("tiny-e2b")


def test_manifest_round_trips_and_lists_graphs_by_role(e2b_export):
    m = ExportManifest.load(e2b_export)
    assert list(m.graphs) == [EMBED, DECODER]
    assert all(m.graph_path(role).is_file() for role in m.graphs)
    assert (m.dtype, m.weight_format, m.activation_dtype) == ("fp32", "fp32", DType.FP32)
    assert json.loads((e2b_export / "export.json").read_text()) == m.to_json()
    assert [CacheSpec.from_dict(c.to_dict()) for c in m.caches] == m.caches


def test_cache_spec_is_the_one_cache_size_rule():
    spec = PRESETS["tiny-e2b"]
    caches = [cache_spec(spec, plan) for plan in spec.cache_layers]
    sliding = [c for c in caches if c.kind == "sliding"]
    full = [c for c in caches if c.kind != "sliding"]
    assert sliding and full
    max_len = 3 * spec.sliding_window + 1  # longer than the window: the ring wraps
    assert all(c.slots(max_len) == spec.sliding_window for c in sliding)
    assert all(c.slots(max_len) == max_len for c in full)
    c = full[0]
    assert c.shape(2, max_len) == (2, c.num_kv_heads, max_len, c.head_dim)
    assert c.to_dict()["slots"] == "cache_len" and "slots_dim" not in c.to_dict()


def test_strict_load_names_the_missing_field(e2b_export, tmp_path):
    copy = shutil.copytree(e2b_export, tmp_path / "export")
    raw = json.loads((copy / "export.json").read_text())
    del raw["caches"]
    (copy / "export.json").write_text(json.dumps(raw))
    with pytest.raises(ExportError, match=r"malformed manifest \(KeyError: 'caches'\)"):
        ExportManifest.load(copy)


def test_lenient_load_takes_a_graph_only_manifest(e2b_export, tmp_path):
    """An export of graphs this tool did not write: graphs only, no spec; an extra role is kept in order."""
    d = tmp_path / "handmade"
    d.mkdir()
    shutil.copy(e2b_export / "decoder.onnx", d / "decoder.onnx")
    shutil.copy(e2b_export / "embed.onnx", d / "vision.onnx")
    raw = {
        "format": "gemma4-compile/export",
        "version": 1,
        "dtype": "fp16",
        "graphs": {"vision": {"file": "vision.onnx"}, "decoder": {"file": "decoder.onnx"}},
    }
    (d / "export.json").write_text(json.dumps(raw))
    m = ExportManifest.load(d, lenient=True)
    assert list(m.graphs) == ["vision", DECODER] and m.spec is None and m.caches == []
    assert m.weight_format == "fp16"  # defaults to the activation dtype
    with pytest.raises(ExportError, match="malformed manifest"):
        ExportManifest.load(d)  # strict wants every field
    (d / "vision.onnx").unlink()
    with pytest.raises(
        ExportError, match=r"vision\.onnx is missing \(listed in export\.json graphs\.vision\)"
    ):
        ExportManifest.load(d, lenient=True)


def test_a_changed_graph_file_fails_its_check(e2b_export, tmp_path):
    copy = shutil.copytree(e2b_export, tmp_path / "export")
    m = ExportManifest.load(copy)
    m.check_graph_file(DECODER)
    with open(copy / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ExportError, match="does not match its sha256"):
        m.check_graph_file(DECODER)


@pytest.mark.parametrize(
    "names",
    [
        ("fp32", "float32", "F32", "FLOAT", 1, "torch.float32"),
        ("fp16", "float16", "F16", "HALF", 10, "torch.float16"),
        ("bf16", "bfloat16", "BF16", "BF16", 16, "torch.bfloat16"),
    ],
)
def test_dtype_parses_every_spelling_to_one_member(names):
    members = {DType.parse(n) for n in names}
    assert len(members) == 1
    d = members.pop()
    assert (d.value, d.onnx_name, d.safetensors_name, d.trt_name, d.onnx_elem_type) == names[:5]
    assert str(d.torch) == names[5]
    assert DType.parse(d.numpy) is d and np.zeros(2, d.numpy).dtype == d.numpy
    assert weight_format_for(d) == d.value


def test_unknown_dtype_is_a_one_line_error():
    with pytest.raises(Gemma4CompileError, match="unsupported dtype 'fp8'; expected one of fp32, fp16, bf16"):
        DType.parse("fp8")
