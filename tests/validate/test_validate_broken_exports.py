"""`gemma4-compile validate` on deliberately broken ONNX exports: each must fail with a clear message.

The exports are real (tiny E2B, onnxruntime backend); the damage is done to the files themselves, as a
buggy exporter or a bad weight conversion would do it.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from gemma4_compile.cli import main


def _external(model: onnx.ModelProto, name: str) -> tuple[int, int]:
    init = next(i for i in model.graph.initializer if i.name == name)
    info = {e.key: e.value for e in init.external_data}
    return int(info["offset"]), int(info["length"])


def _edit_weight(export, name: str, change) -> None:
    model = onnx.load(str(export / "decoder.onnx"), load_external_data=False)
    offset, length = _external(model, name)
    with open(export / "weights.data", "r+b") as f:
        f.seek(offset)
        values = np.frombuffer(f.read(length), dtype=np.float32).copy()
        f.seek(offset)
        f.write(change(values).astype(np.float32).tobytes())


def scale_gate_weight(export) -> None:
    _edit_weight(export, "model.layers.2.mlp.gate_proj.weight", lambda w: w * 1.05)


def window_off_by_one(export) -> None:
    model = onnx.load(str(export / "decoder.onnx"), load_external_data=False)
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "SlidingWindowAttention" and attr.name == "window" and attr.i > 0:
                attr.i += 1
    onnx.save_model(model, str(export / "decoder.onnx"))


def drop_layer_scalar(export) -> None:
    model = onnx.load(str(export / "decoder.onnx"), load_external_data=False)
    for init in model.graph.initializer:
        if init.name.endswith("layer_scalar"):
            _edit_weight(export, init.name, np.ones_like)


@pytest.mark.parametrize("damage", [scale_gate_weight, window_off_by_one, drop_layer_scalar])
def test_validate_fails_on_a_broken_export(damage, make_export, make_checkpoint, reseal, tmp_path, capsys):
    export = tmp_path / "export"
    shutil.copytree(make_export("tiny-e2b"), export)
    ckpt = str(make_checkpoint("tiny-e2b"))
    assert main(["validate", str(export), "--checkpoint", ckpt, "--steps", "4"]) == 0  # intact: passes
    damage(export)
    reseal(export)  # as a buggy exporter would have recorded it: the numbers must find the damage
    code = main(["validate", str(export), "--checkpoint", ckpt, "--steps", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and "max |Δlogit|" in err[0], err
