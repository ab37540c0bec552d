"""The gathered tables (token embedding, PLE table) as int8 rows: the embed graph's gather-then-dequantize form,
and onnxruntime fed only the rows a call reads (runners/rows.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from gemma4_compile.errors import RunnerError
from gemma4_compile.export import ExportManifest
from gemma4_compile.runners.ort import OrtRunner
from gemma4_compile.runners.rows import RowReader, RowTable
from gemma4_compile.validate.validate import validate

STEPS = 4


def _reader(placeholders=(), pad=0, vocab=50) -> RowReader:
    return RowReader([RowTable("t", __file__, 0, (vocab, 1), np.dtype(np.uint8))], placeholders, pad)


def test_renumbering_keeps_placeholders_and_pad_and_packs_the_rest():
    ids = np.array([[7, 0, 900, 7, 42, 900, 3]])
    renumbered, source = _reader(placeholders=(900,)).renumber(ids)
    assert renumbered.tolist() == [[2, 0, 900, 2, 3, 900, 1]]  # pad keeps 0; 3, 7, 42 take 1, 2, 3
    assert source == [0, 3, 7, 42]  # slot -> the row that fills it
    renumbered, source = _reader(placeholders=(2,), pad=5).renumber(np.array([[9, 2, 8]]))
    assert renumbered.tolist() == [[1, 2, 0]] and source == [8, 9, 5, 5, 5, 5]  # slot 2 is never read
    with pytest.raises(RunnerError, match="token id 50 is outside the vocabulary"):
        _reader().renumber(np.array([[1, 50]]))
    with pytest.raises(RunnerError, match="token id -1 is outside the vocabulary"):
        _reader().renumber(np.array([[-1, 3]]))


@pytest.mark.parametrize("seed", range(4))
def test_renumbered_ids_read_the_rows_of_the_original_ids(seed):
    """Any batch: each gathered id's slot holds its row, placeholders pass through, slots are packed."""
    rng = np.random.default_rng(seed)
    placeholders, pad = (48, 3), int(rng.choice([0, 1, 2, 5, 9]))
    ids = rng.choice([*range(0, 45), 48, 3], size=(3, 17))
    renumbered, source = _reader(placeholders, pad).renumber(ids)
    kept = np.isin(ids, placeholders)
    assert (renumbered[kept] == ids[kept]).all() and renumbered.shape == ids.shape
    assert (np.array(source)[renumbered[~kept]] == ids[~kept]).all() and source[pad] == pad
    others = np.setdiff1d(ids[~kept], [pad])
    assert len(source) <= max(pad + 1, len(others) + len(placeholders) + 1)


def test_tables_are_int8_rows_fed_by_row_and_match_the_loaded_tables_exactly(make_quant_export):
    out = make_quant_export("tiny-e2b", "int4")
    proto = onnx.load(str(out / "embed.onnx"), load_external_data=False)
    external = {
        i.name: i.data_type for i in proto.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL
    }
    assert (
        sorted(external.values()) == [onnx.TensorProto.FLOAT] * 2 + [onnx.TensorProto.INT8] * 2
    )  # scales, codes
    assert ExportManifest.load(out).quant.roles["ple_table"] == "int8"
    rows, loaded = OrtRunner(out), OrtRunner(out, read_rows=False)
    assert sorted(t.name for t in rows.rows.tables) == sorted(external) and loaded.rows is None
    spec = rows.spec
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, (2, 3 * spec.sliding_window + 3))
    np.testing.assert_array_equal(rows.logits(ids), loaded.logits(ids))
    np.testing.assert_array_equal(rows.generate(ids, 3), loaded.generate(ids, 3))  # the bound decode path too


def test_a_row_scale_layout_bug_fails_the_gate(make_quant_export, corrupt):
    """Every PLE row read with its neighbour's scales: the packing bug a row-order change makes."""
    out = make_quant_export("tiny-e2b", "int4")
    proto = onnx.load(str(out / "embed.onnx"), load_external_data=False)
    scales = next(i for i in proto.graph.initializer if i.name.endswith("per_layer.weight_scales"))
    row = scales.dims[1] * 4  # fp32 scales per row
    broken = corrupt(
        out, onnx.TensorProto.FLOAT, lambda raw: np.roll(raw, row), "per_layer.weight_scales", "embed"
    )
    assert validate(out, steps=STEPS, write=False).passed
    assert not validate(broken, steps=STEPS, write=False).passed


def test_engines_leave_the_int8_row_embed_graph_on_the_cpu(make_quant_export):
    """TensorRT takes INT8 constants only before a DequantizeLinear: the default build skips the embed graph of a
    quantized export (the runners run it on the CPU, by row), and asking for it is refused in one line."""
    from gemma4_compile.engines.profiles import engine_roles
    from gemma4_compile.errors import BuildError

    export = ExportManifest.load(make_quant_export("tiny-e2b", "int4"))
    assert engine_roles(export) == ("decoder",)
    with pytest.raises(BuildError, match="embed graph gathers int8 rows") as err:
        engine_roles(export, ("decoder", "embed"))
    assert "\n" not in str(err.value)
