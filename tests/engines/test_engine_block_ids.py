"""The decoder of a 26B/31B export with images (attention nodes with the 8th input `block_ids`): TensorRT-RTX
inlines the 8-input function body, or hands the node to its attention plugin with all 8 inputs, and builds it
ahead of time on the CPU; full TensorRT's 7-input attention QDP has a fixed signature, so the engine builder
gives those nodes the 8-input QDP's op type where it is registered (passes/block_attention.py), and refuses a
plugin build in one line instead of dropping the input where it is not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest
import torch

from gemma4_compile.engines import build_engines
from gemma4_compile.engines.prepare import _block_attention, _refuse_unplugged_inputs
from gemma4_compile.engines.seam import TrtFlavour
from gemma4_compile.errors import BuildError
from gemma4_compile.export import export_checkpoint
from gemma4_compile.model.checkpoint import write_random_checkpoint
from gemma4_compile.model.presets import PRESETS, VISION_PRESETS
from gemma4_compile.passes import plugin_lookup


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("block-ids-engine")
    write_random_checkpoint(
        PRESETS["tiny-31b"], root / "ckpt", dtype=torch.float32, vision=VISION_PRESETS["tiny-31b"]
    )
    export_checkpoint(root / "ckpt", root / "out", dtype="fp16", max_seq_len=16)
    return root / "out"


def _decoder(export_dir) -> ir.Model:
    return ir.serde.deserialize_model(onnx.load(str(export_dir / "decoder.onnx"), load_external_data=False))


@pytest.mark.rtx
def test_the_block_ids_body_is_inlined_and_builds(export_dir):
    (art,) = build_engines(
        export_dir, ["sm89"], graphs=("decoder",), max_batch=1, max_seq=16, opt_level=0, progress=False
    )
    report = json.loads(art.capability_path.read_text())
    assert report["ok"] and report["rejected"] == []
    assert report["counts"] == {"inlined": len(PRESETS["tiny-31b"].layers)}
    profile = art.manifest.graphs["decoder"].profiles[0]
    assert profile.shape("mm_block_ids").max == (1, 16)


def test_a_plugin_that_would_drop_block_ids_is_refused_in_one_line(export_dir):
    model = _decoder(export_dir)
    with pytest.raises(
        BuildError, match="full-TensorRT SlidingWindowAttention plugin does not take 'block_i"
    ) as e:
        _refuse_unplugged_inputs(model, lambda node: True, optional_inputs=False)
    assert "\n" not in str(e.value)
    _refuse_unplugged_inputs(model, lambda node: False, optional_inputs=False)  # inlined bodies take it
    _refuse_unplugged_inputs(model, lambda node: True, optional_inputs=True)  # the RTX plugin takes it


QDP_CREATORS = {
    ("SlidingWindowAttention", "1", "gemma4"),
    ("SlidingWindowAttentionBlocks", "1", "gemma4"),
}


def test_full_tensorrt_gives_block_id_nodes_the_8_input_plugin(export_dir):
    """What engines/prepare.py does on full TensorRT with the QDPs registered (qdp.register_qdp): every attention
    node of a 26B/31B image export carries block_ids and is renamed, so no node is refused and each finds a
    creator; without the 8-input QDP, or on TensorRT-RTX, nothing is renamed."""
    full, rtx = TrtFlavour("tensorrt", "10.x", module=None), TrtFlavour("tensorrt_rtx", "1.x", module=None)
    model = _decoder(export_dir)
    attention = [n for n in model.graph if n.domain == "gemma4"]
    assert attention and all(len(n.inputs) == 8 for n in attention)
    assert (
        _block_attention(model, QDP_CREATORS - {("SlidingWindowAttentionBlocks", "1", "gemma4")}, full) == 0
    )
    assert _block_attention(model, QDP_CREATORS, rtx) == 0
    assert {n.op_type for n in attention} == {"SlidingWindowAttention"}
    assert _block_attention(model, QDP_CREATORS, full) == len(attention)
    assert {n.op_type for n in attention} == {"SlidingWindowAttentionBlocks"}
    assert all(len(n.inputs) == 8 for n in attention)  # only the op type changes
    _refuse_unplugged_inputs(model, plugin_lookup(QDP_CREATORS), optional_inputs=False)  # nothing dropped
    assert all(plugin_lookup(QDP_CREATORS)(n) for n in attention)


PLUGIN_BUILD = textwrap.dedent(
    """
    import json, sys
    from gemma4_compile.engines import build_engines
    (art,) = build_engines(sys.argv[1], ["sm89"], graphs=("decoder",), plugins=True, max_batch=1, max_seq=16,
                           opt_level=0, progress=False)
    print(json.dumps(json.loads(art.capability_path.read_text())))
    """
)


@pytest.mark.rtx
def test_the_rtx_attention_plugin_takes_block_ids_and_builds(export_dir, tmp_path):
    """In a subprocess whose loader finds libtensorrt_rtx.so (gemma4_compile.plugins.rtx): every attention node,
    8 inputs, becomes a PLUGIN_V3 layer; the build itself runs on the CPU."""
    from gemma4_compile.plugins import rtx

    out = Path(
        shutil.copytree(export_dir, tmp_path / "out")
    )  # engines go into the export: keep the fixture's
    env = rtx.parser_library_env(tmp_path / "lib")
    env["PYTHONPATH"] = os.pathsep.join([str(Path.cwd()), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-c", PLUGIN_BUILD, str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["counts"] == {"plugin": len(PRESETS["tiny-31b"].layers)}
    assert {n["trt_layer_type"] for n in report["nodes"]} == {"PLUGIN_V3"}
