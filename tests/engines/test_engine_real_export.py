"""Engines from the real exporter's output (a random tiny-e2b checkpoint), built by TensorRT-RTX on the CPU."""

from __future__ import annotations

import json

import pytest
from engines_support import has_exporter

from gemma4_compile.engines import build_engines

pytestmark = [
    pytest.mark.rtx,
    pytest.mark.skipif(
        not has_exporter(), reason="gemma4_compile.export.export_checkpoint is not available yet"
    ),
]


@pytest.mark.parametrize(("dtype", "target"), [("fp16", "sm89"), ("bf16", "sm120")])
def test_tiny_e2b_builds_inline(real_exports, dtype, target):
    out = real_exports("tiny-e2b", dtype)
    (art,) = build_engines(out, [target], max_batch=2, max_seq=64, progress=False)
    export = json.loads((out / "export.json").read_text())
    report = json.loads(art.capability_path.read_text())
    assert report["ok"] and art.manifest.precision == dtype and art.manifest.target == target
    assert [n["name"] for n in report["nodes"]] == [n["name"] for n in export["custom_nodes"]]
    assert {n["path"] for n in report["nodes"]} == {"inlined"}
    attention = [n for n in report["nodes"] if n["op_type"] == "SlidingWindowAttention"]
    assert len(attention) == export["spec"]["num_hidden_layers"]  # one per layer
    io = {t["name"]: t for t in art.manifest.io}
    assert set(io) == {t["name"] for g in ("inputs", "outputs") for t in export["graphs"]["decoder"][g]}
    assert art.manifest.files["decoder.engine"]["bytes"] > 1_000_000
    log = (art.dir / "build.log").read_text()  # inlined bodies' repeated node names: one counted line
    assert len([line for line in log.splitlines() if "already exists" in line]) <= 1
