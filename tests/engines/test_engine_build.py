"""Real TensorRT-RTX builds (ahead of time, on the CPU) from synthetic exports: engines, manifests, capability."""

from __future__ import annotations

import json
import threading

import pytest
from engines_synthetic import write_synthetic_export

from gemma4_compile.engines import build_engines, check_engine, load_trt, open_engine, read_manifest
from gemma4_compile.fsutil import sha256_file

pytestmark = pytest.mark.rtx


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_builds_sm89_and_sm120_inline(fresh_export, dtype):
    out = fresh_export(dtype)
    artifacts = build_engines(out, ["sm89", "rtx5090"], max_batch=2, max_seq=32, progress=False)
    assert [a.target for a in artifacts] == ["sm89", "sm120"]
    rtx = load_trt("tensorrt_rtx")
    export = json.loads((out / "export.json").read_text())
    for art in artifacts:
        assert art.dir == out / "engines" / art.target and not art.reused
        assert sorted(p.name for p in art.dir.iterdir()) == [  # one engine per graph of the export
            "build.log",
            "capability.json",
            "decoder.engine",
            "embed.build.log",
            "embed.capability.json",
            "embed.engine",
            "manifest.json",
        ]
        m = read_manifest(art.dir)
        assert m == art.manifest
        assert (m.flavour, m.trt_version, m.precision, m.weight_format) == (
            "tensorrt_rtx",
            rtx.version,
            dtype,
            dtype,
        )
        assert m.sm == int(art.target.removeprefix("sm"))
        log = (art.dir / "build.log").read_text()  # the builder's own figures, recorded from its log
        assert m.device_memory["activation_bytes"] > 0 and m.device_memory["weights_bytes"] > 0
        assert f"Total Activation Memory: {m.device_memory['activation_bytes']} bytes" in log
        assert m.export_sha256 == sha256_file(out / "export.json")
        assert m.decoder_sha256 == export["graphs"]["decoder"]["sha256"]
        assert m.files["decoder.engine"] == {
            "sha256": sha256_file(art.engine_path),
            "bytes": art.engine_path.stat().st_size,
        }
        assert m.files["decoder.engine"]["bytes"] > 100_000
        assert [p.name for p in m.profiles] == ["prefill", "decode"]
        assert m.profiles[0].shape("inputs_embeds").max == (2, 32, 32)
        assert m.opt_level == 3 and m.hardware_compat == "n/a"
        assert m.timing_cache["used"] is False and "no-ops" in m.timing_cache["reason"]
        assert m.build_seconds > 0 and m.memory["peak_rss_bytes"] >= m.memory["start_rss_bytes"] > 0
        assert m.plugins == {
            "requested": False,
            "registered": [],
            "error": None,
            "plugins_sha256": None,
            "kernels_sha256": None,
            "kernels_file": None,
        }
        # strongly typed: the engine's I/O dtypes are the graph's
        io = {t["name"]: t["dtype"] for t in m.io}
        want = {"fp16": "HALF", "bf16": "BF16"}[dtype]
        assert io["inputs_embeds"] == io["present.1.key"] == want and io["logits"] == "FLOAT"
        assert io["past_len"] == "INT64"
        check_engine(m, rtx, m.sm)
        assert open_engine(art.dir, rtx, m.sm).path == art.engine_path


def test_capability_reports_every_custom_node_inlined(fresh_export):
    out = fresh_export("fp16")
    (art,) = build_engines(out, ["sm89"], max_batch=1, max_seq=16, progress=False)
    report = json.loads(art.capability_path.read_text())
    export = json.loads((out / "export.json").read_text())
    assert report["ok"] and report["rejected"] == [] and report["counts"] == {"inlined": 3}
    assert [n["name"] for n in report["nodes"]] == [n["name"] for n in export["custom_nodes"]]
    for node in report["nodes"]:
        assert node["path"] == "inlined" and node["op_type"] == "SlidingWindowAttention"
        assert node["trt_layer_type"] not in ("PLUGIN_V3", "PLUGIN_V2") and "note" not in node
    edits = {"renamed": {}, "folded_constants": 0, "split_moe": 0, "aot": 0, "static_moe_body": False}
    edits["fp32_nodes"] = 1  # the fp32 logits of the fp16 graph
    edits["block_attention"] = 0  # no block_ids (and RTX's plugin would take them anyway)
    edits["fused_attention"] = 0  # the decoder's attention is the custom op, no standard-op chain
    assert report["graph_edits"] == edits
    assert art.manifest.capability == {"inlined": 3}


def test_an_op_named_like_a_builtin_is_renamed_to_reach_its_function(tmp_path):
    """gemma4::Attention would go to TensorRT's own ONNX Attention importer (which takes one output only)."""
    out = write_synthetic_export(tmp_path / "old-name", "fp16", max_seq_len=16, attention_op="Attention")
    (art,) = build_engines(out, ["sm120"], max_batch=1, progress=False)
    report = json.loads(art.capability_path.read_text())
    assert report["graph_edits"]["renamed"] == {"gemma4::Attention": "gemma4_Attention"}
    for node in report["nodes"]:
        assert node["path"] == "inlined" and node["op_type"] == "Attention"
        assert "parsed as 'gemma4_Attention'" in node["note"]


def test_up_to_date_engines_are_reused_and_force_rebuilds(fresh_export):
    out = fresh_export("fp16")
    (first,) = build_engines(out, ["sm89"], max_batch=1, max_seq=16, progress=False)
    (again,) = build_engines(out, ["l40s"], max_batch=1, max_seq=16, progress=False)
    assert again.reused and again.manifest == first.manifest
    (other,) = build_engines(out, ["sm89"], max_batch=1, max_seq=16, opt_level=1, progress=False)
    assert not other.reused and other.manifest.opt_level == 1  # different options: rebuilt
    (forced,) = build_engines(out, ["sm89"], max_batch=1, max_seq=16, opt_level=1, force=True, progress=True)
    assert not forced.reused and forced.manifest.created_at >= other.manifest.created_at
    leftovers = [p.name for p in (out / "engines").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # staging directories never survive


def test_a_damaged_engine_is_rebuilt_not_reused(fresh_export):
    out = fresh_export("fp16")
    (art,) = build_engines(out, ["sm89"], max_batch=1, max_seq=16, progress=False, profiles=("decode",))
    assert [p.name for p in art.manifest.profiles] == ["decode"]
    with open(art.engine_path, "r+b") as f:
        f.write(b"\0" * 16)
    (again,) = build_engines(out, ["sm89"], max_batch=1, max_seq=16, progress=False, profiles=("decode",))
    assert not again.reused
    assert sha256_file(again.engine_path) == again.manifest.files["decoder.engine"]["sha256"]


def test_progress_monitor_mirrors_tensorrt_phases(synthetic_exports, tmp_path):
    """TensorRT-RTX's IProgressMonitor drives the rich display (forced onto a fake terminal here)."""
    import io

    from rich.console import Console
    from rich.progress import Progress

    from gemma4_compile.engines import BuildOptions, BuildRecord, derive_profiles, read_export, resolve_target
    from gemma4_compile.engines.build import GraphRecord, config_from_network, engine_from_network
    from gemma4_compile.engines.prepare import capability_report, network_from_onnx
    from gemma4_compile.engines.progress import make_monitor
    from gemma4_compile.engines.seam import KernelsFile, register

    export, rtx = read_export(synthetic_exports["fp16"]), load_trt("tensorrt_rtx")
    options = BuildOptions(max_batch=1, max_seq=8, progress=True)
    graph = GraphRecord("decoder", derive_profiles(export, options.limits))
    record = BuildRecord(export, resolve_target("sm86"), rtx, options, (graph,), KernelsFile())
    record.plugins = register(rtx, False, export.path, record.kernels)
    graph.parsed = parsed = network_from_onnx(export, rtx)
    graph.report = capability_report("sm86", export, parsed, record.plugins)
    config = config_from_network(record, graph)
    screen = io.StringIO()
    with Progress(console=Console(file=screen, force_terminal=True, width=120)) as progress:
        monitor = make_monitor(rtx, progress, "sm86:", threading.Event())
        plan = engine_from_network(parsed, config, tmp_path / "decoder.engine", "sm86", monitor)
    assert plan.bytes > 0 and plan.sha256 == sha256_file(tmp_path / "decoder.engine")
    assert monitor.phases[0] == "Building engine" and "Computing profile costs" in monitor.phases
    assert "sm86: Building engine" in screen.getvalue()


def test_only_the_exports_own_kernels_directory_is_handed_to_the_plugins(tmp_path):
    """Full TensorRT's AOT plugins compile into it, so an installed package's kernels.json must not qualify."""
    from gemma4_compile.engines.seam import _export_kernels_dir

    export = tmp_path / "out"
    assert _export_kernels_dir(str(export / "kernels" / "kernels.json"), export) == export / "kernels"
    assert _export_kernels_dir(str(tmp_path / "site-packages" / "kernels.json"), export) is None
    assert _export_kernels_dir(None, export) is None
