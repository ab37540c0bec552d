"""A MoE export (its function body selects tokens with NonZero, which TensorRT-RTX cannot import) builds by
inlining once the engine builder swaps in the static-shape body; built by TensorRT-RTX on the CPU."""

from __future__ import annotations

import json

import pytest
from engines_support import has_exporter

from gemma4_compile.engines import build_engines

pytestmark = [
    pytest.mark.rtx,
    pytest.mark.skipif(not has_exporter(), reason="gemma4_compile.export.export_checkpoint is not available"),
]


def test_tiny_moe_export_builds_with_the_static_body(real_exports):
    out = real_exports("tiny-26b-a4b", "fp16")
    (art,) = build_engines(out, ["sm89"], max_batch=2, max_seq=64, progress=False)
    report = json.loads(art.capability_path.read_text())
    assert report["ok"], report
    assert report["graph_edits"]["static_moe_body"] is True
    moe = [n for n in report["nodes"] if n["op_type"] == "MoE"]
    assert moe and {n["path"] for n in moe} == {"inlined"}
