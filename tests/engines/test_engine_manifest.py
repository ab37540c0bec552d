"""The manifest check that refuses an engine built for another TensorRT or GPU, and file verification."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from gemma4_compile.engines import (
    EngineManifest,
    build_engines,
    check_engine,
    load_trt,
    open_engine,
    read_manifest,
)
from gemma4_compile.engines.seam import TrtFlavour
from gemma4_compile.errors import BackendUnavailable, BuildError

pytestmark = pytest.mark.rtx


@pytest.fixture(scope="module")
def built(synthetic_exports, tmp_path_factory):
    import shutil

    out = tmp_path_factory.mktemp("manifest") / "export"
    shutil.copytree(synthetic_exports["fp16"], out)
    (art,) = build_engines(out, ["sm89"], max_batch=1, max_seq=16, progress=False)
    return art


def test_manifest_roundtrips_through_json(built):
    raw = json.loads(built.manifest_path.read_text())
    assert raw["format"] == "gemma4-compile/engine" and raw["version"] == 2
    assert EngineManifest.from_dict(raw) == built.manifest
    assert raw["engine_file"] == "decoder.engine" == raw["graphs"]["decoder"]["engine_file"]
    assert raw["device_memory"] == raw["graphs"]["decoder"]["device_memory"]  # for version-1 readers
    assert set(raw["graphs"]) == {"embed", "decoder"}
    decoder, embed = (
        ("decoder.engine", "capability.json", "build.log"),
        ("embed.engine", "embed.capability.json"),
    )
    assert set(raw["files"]) == {*decoder, *embed, "embed.build.log"}


def test_check_engine_accepts_the_exact_match(built):
    check_engine(built.manifest, load_trt("tensorrt_rtx"), 89)
    check_engine(built.manifest, load_trt("tensorrt_rtx"), "sm89")


@pytest.mark.parametrize(
    ("flavour", "device", "found"),
    [
        ("same", 90, "found TensorRT-RTX {v} on sm90"),
        ("same", None, "found TensorRT-RTX {v} on no CUDA GPU"),
        ("other", 89, "found TensorRT-RTX 0.9.0 on sm89"),
        ("full", 89, "found TensorRT 11.4.0.106 on sm89"),
        (None, 89, "found no TensorRT on sm89"),
    ],
)
def test_check_engine_refuses_a_mismatch(built, flavour, device, found):
    rtx = load_trt("tensorrt_rtx")
    at_hand = {
        "same": rtx,
        "other": replace(rtx, version="0.9.0"),
        "full": TrtFlavour("tensorrt", "11.4.0.106", rtx.module),
        None: None,
    }[flavour]
    with pytest.raises(BackendUnavailable) as info:
        check_engine(built.manifest, at_hand, device)
    expected = f"engine sm89: expected TensorRT-RTX {rtx.version} on sm89, {found.format(v=rtx.version)}"
    assert str(info.value) == expected


def test_open_engine_checks_then_verifies_files(built, tmp_path):
    import shutil

    rtx = load_trt("tensorrt_rtx")
    copy = tmp_path / "sm89"
    shutil.copytree(built.dir, copy)
    assert open_engine(copy, rtx, 89).manifest == built.manifest
    with pytest.raises(BackendUnavailable, match=r"expected TensorRT-RTX .* on sm89, found .* on sm120"):
        open_engine(copy, rtx, 120)
    (copy / "decoder.engine").write_bytes(b"truncated")
    with pytest.raises(BuildError, match=r"decoder\.engine does not match its sha256"):
        open_engine(copy, rtx, 89)
    (copy / "manifest.json").unlink()
    with pytest.raises(BuildError, match=r"no manifest\.json"):
        read_manifest(copy)
