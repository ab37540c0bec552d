"""One engine per graph: TensorRT-RTX builds the vision, audio and embed graphs of ONE tiny-e2b vision+audio
export (fp16, so the towers' fp32 islands are exercised) for sm89 and sm120, ahead of time on the CPU.

The decoder is left out here (--graphs): test_engine_build.py builds it, and it would double the build time.
Profiles are the smallest that still span every dynamic axis; opt level 0 (the builder's cheapest).
"""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch

from gemma4_compile.cli import engine_lines, main
from gemma4_compile.engines import build_engines, load_trt, open_engine, read_manifest
from gemma4_compile.engines.manifest import EngineManifest
from gemma4_compile.engines.prepare import network_from_onnx
from gemma4_compile.engines.profiles import engine_roles
from gemma4_compile.errors import BuildError
from gemma4_compile.export import ExportManifest, export_checkpoint
from gemma4_compile.fsutil import sha256_file
from gemma4_compile.model.checkpoint import write_random_checkpoint
from gemma4_compile.model.presets import AUDIO_PRESETS, PRESETS, VISION_PRESETS

pytestmark = pytest.mark.rtx

TOWERS = ("vision", "audio", "embed")
LIMITS = dict(max_batch=1, max_seq=16, max_images=2, max_image_tokens=4, max_clips=1, max_frames=48)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm-engines")
    vision, audio = VISION_PRESETS["tiny-e2b"], AUDIO_PRESETS["tiny-e2b"]
    write_random_checkpoint(
        PRESETS["tiny-e2b"], root / "ckpt", dtype=torch.float32, vision=vision, audio=audio
    )
    export_checkpoint(root / "ckpt", root / "out", dtype="fp16", max_seq_len=16)
    return root / "out"


@pytest.fixture(scope="module")
def built(export_dir):
    return build_engines(export_dir, ["sm89", "sm120"], graphs=TOWERS, opt_level=0, progress=False, **LIMITS)


def test_every_graph_gets_an_engine_with_its_own_profiles(built, export_dir):
    graphs = json.loads((export_dir / "export.json").read_text())["graphs"]
    assert [a.target for a in built] == ["sm89", "sm120"]
    for art in built:
        m = read_manifest(art.dir)
        assert m == art.manifest and list(m.graphs) == ["vision", "audio", "embed"]  # the export's order
        for role, g in m.graphs.items():
            assert (g.onnx_file, g.onnx_sha256) == (graphs[role]["file"], graphs[role]["sha256"])
            engine = art.dir / g.engine_file
            assert g.engine_file == f"{role}.engine" and art.engine_paths[role] == engine
            assert m.files[g.engine_file] == {"sha256": sha256_file(engine), "bytes": engine.stat().st_size}
            assert m.files[g.engine_file]["bytes"] > 10_000 and g.build_seconds > 0
            assert g.capability == {} and (art.dir / f"{role}.capability.json").is_file()
        profiles = {role: {p.name: p for p in g.profiles} for role, g in m.graphs.items()}
        vision = profiles["vision"]["images"].shape("pixel_values")
        assert (vision.min, vision.opt, vision.max) == ((1, 9, 768), (1, 36, 768), (2, 36, 768))
        frames = profiles["audio"]["clips"].shape("input_features_mask")
        assert (frames.min, frames.max) == ((1, 1), (1, 48))
        rows = profiles["embed"]["prefill"].shape("image_embeds")
        assert (rows.min[0], rows.max[0]) == (0, 8)  # none (text steps) to max_images x max_image_tokens
        assert profiles["embed"]["decode"].shape("input_ids").max == (1, 1)
        io = {t["name"]: t["dtype"] for g in m.graphs.values() for t in g.io}
        assert io["pixel_values"] == io["input_features"] == io["audio_soft_tokens"] == "HALF"
        with pytest.raises(
            BuildError, match=r"^engine sm\d+ has no decoder engine \(built: vision, audio, embed\)"
        ):
            _ = m.decoder
    again = build_engines(export_dir, ["sm89"], graphs=TOWERS, opt_level=0, progress=False, **LIMITS)
    assert again[0].reused and again[0].manifest == built[0].manifest


def test_half_precision_towers_keep_their_fp32_islands(built, export_dir):
    """The audio attention is an fp32 island in the ONNX (export-format.md); the strongly typed network keeps it."""
    model = onnx.load(str(export_dir / "audio.onnx"), load_external_data=False)
    dtypes = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    softmax_in = [dtypes.get(n.input[0]) for n in model.graph.node if n.op_type == "Softmax"]
    assert softmax_in and set(softmax_in) == {onnx.TensorProto.FLOAT}  # what the ONNX marks
    rtx = load_trt("tensorrt_rtx")
    net = network_from_onnx(ExportManifest.load(export_dir), rtx, role="audio").network
    layers = [net.get_layer(i) for i in range(net.num_layers)]
    softmax = [la.get_output(0).dtype for la in layers if la.type == rtx.module.LayerType.SOFTMAX]
    assert len(softmax) == len(softmax_in) and set(softmax) == {rtx.module.DataType.FLOAT}
    for art in built:
        assert art.manifest.graphs["audio"].fp32_layers >= len(softmax)
        assert art.manifest.graphs["vision"].fp32_layers > 0  # RoPE, pooling and norms in fp32


def test_vision_attention_reaches_tensorrt_as_one_attention_layer_per_layer(built, export_dir):
    """FuseAttention (engines/prepare.py): no generic softmax left in the vision network; the audio tower's
    capped attention keeps its layers. capability.json records the count."""
    rtx = load_trt("tensorrt_rtx")
    kinds = rtx.module.LayerType
    layers = VISION_PRESETS["tiny-e2b"].num_hidden_layers
    for role, fused in (("vision", layers), ("audio", 0)):
        parsed = network_from_onnx(ExportManifest.load(export_dir), rtx, role=role)
        types = [parsed.network.get_layer(i).type for i in range(parsed.network.num_layers)]
        assert parsed.edits.fused_attention == fused == types.count(kinds.ATTENTION_OUTPUT)
        assert (kinds.SOFTMAX in types) == (fused == 0)
    for art in built:
        report = json.loads((art.dir / "vision.capability.json").read_text())
        assert report["graph_edits"]["fused_attention"] == layers


def test_a_network_that_lost_its_fp32_islands_is_refused(export_dir, tmp_path, monkeypatch):
    from gemma4_compile.engines import build

    copy = tmp_path / "out"
    shutil.copytree(export_dir, copy, ignore=shutil.ignore_patterns("engines"))
    monkeypatch.setattr(build, "fp32_layers", lambda parsed: 0)  # as if a pass had cast every island to fp16
    with pytest.raises(BuildError, match=r"^sm89 embed: embed\.onnx computes \d+ nodes in fp32, the parsed"):
        build_engines(copy, ["sm89"], graphs=("embed",), opt_level=0, progress=False, **LIMITS)
    assert not (copy / "engines" / "sm89").exists() and (copy / "engines" / "sm89.failed").is_dir()


def test_a_changed_graph_or_engine_is_refused_naming_it(built, export_dir, tmp_path, reseal):
    copy = tmp_path / "out"
    shutil.copytree(export_dir, copy)
    rtx, directory = load_trt("tensorrt_rtx"), copy / "engines" / "sm89"
    assert open_engine(directory, rtx, 89, export=ExportManifest.load(copy), role="vision").path.is_file()
    with (copy / "vision.onnx").open("ab") as f:
        f.write(b"\0")  # a different vision graph, recorded in export.json as a re-export would
    reseal(copy)
    with pytest.raises(BuildError) as info:
        open_engine(directory, rtx, 89, export=ExportManifest.load(copy), role="audio")
    assert str(info.value).startswith("engine sm89: vision.engine was built from vision.onnx ")
    assert "the export's vision.onnx is" in str(info.value) and "\n" not in str(info.value)
    shutil.copytree(export_dir, tmp_path / "fresh")
    (tmp_path / "fresh" / "engines" / "sm120" / "audio.engine").write_bytes(b"truncated")
    with pytest.raises(BuildError, match=r"audio\.engine does not match its sha256"):
        open_engine(tmp_path / "fresh" / "engines" / "sm120", rtx, 120, role="embed")


def test_build_summary_has_one_line_per_engine(built):
    lines = engine_lines(built[1])
    assert [line.split(":")[0] for line in lines] == [
        "built vision sm120",
        "built audio sm120",
        "built embed sm120",
    ]
    assert all(" MiB, " in line and " s build, device memory" in line for line in lines)


def test_graphs_are_chosen_by_name(export_dir, capsys):
    export = ExportManifest.load(export_dir)
    assert engine_roles(export) == ("vision", "audio", "embed", "decoder")
    assert engine_roles(export, ("decoder", "vision")) == ("vision", "decoder")
    assert main(["build", str(export_dir), "--target", "sm89", "--graphs", "decoder,video"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --graphs: video not in this export; choose from vision, audio, embed, decoder"]


def test_a_version_1_manifest_reads_as_one_decoder_engine(built):
    v1 = {k: v for k, v in built[0].manifest.to_dict().items() if k != "graphs"}
    profile = {"name": "decode", "inputs": {"x": {"min": [1], "opt": [1], "max": [1]}}}
    v1.update(version=1, decoder_sha256="ab" * 32, profiles=[profile], capability={"inlined": 3})
    v1.update(io=[], phase_seconds={"total": 1.0}, device_memory={}, engine_file="decoder.engine")
    m = EngineManifest.from_dict(v1)
    assert list(m.graphs) == ["decoder"] and m.engine_file == "decoder.engine"
    assert m.decoder_sha256 == "ab" * 32 and m.capability == {"inlined": 3}
    assert m.profiles[0].shape("x").max == (1,) and m.decoder.fp32_layers is None


def test_tower_profiles_default_to_the_exports_limits(export_dir):
    from gemma4_compile.engines import ProfileLimits, derive_profiles

    export = ExportManifest.load(export_dir)
    (images,) = derive_profiles(export, ProfileLimits(), "vision")
    assert images.shape("image_position_ids").max == (8, 2520, 2)  # multimodal.max_images, 280 soft tokens
    (clips,) = derive_profiles(export, ProfileLimits(), "audio")
    assert clips.shape("input_features").max == (1, 3000, 128)  # one clip of 30 s
    with pytest.raises(
        BuildError, match=r"^max_clips must be >= 1 and max_frames in 1\.\.3000, got 1 and 3001$"
    ):
        derive_profiles(export, ProfileLimits(max_frames=3001), "audio")
