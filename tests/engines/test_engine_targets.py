"""GPU target table and the choice of TensorRT flavour per target (no engine builds here)."""

from __future__ import annotations

import pytest

from gemma4_compile.engines import TARGETS, list_targets, load_trt, resolve_target
from gemma4_compile.engines.build import plan_builds
from gemma4_compile.engines.seam import RTX, choose_flavour
from gemma4_compile.errors import BuildError, Gemma4CompileError
from gemma4_compile.targets import local_device_sm, target_for_sm


@pytest.mark.parametrize(
    ("name", "sm"),
    [
        ("sm80", 80),
        ("sm86", 86),
        ("sm89", 89),
        ("sm90", 90),
        ("sm100", 100),
        ("sm120", 120),
        ("SM_90", 90),
        ("H200", 90),
        ("h100", 90),
        ("a100", 80),
        ("l40s", 89),
        ("rtx4090", 89),
        ("rtx5090", 120),
        ("b200", 100),
    ],
)
def test_resolve_by_sm_and_gpu_name(name, sm):
    assert resolve_target(name).sm == sm


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(
        Gemma4CompileError, match=r"unknown GPU target 'h300'; known targets: sm75, .*h200.*native"
    ):
        resolve_target("h300")


def test_gpu_names_are_unique_across_targets():
    names = [g for t in TARGETS.values() for g in t.gpus]
    assert len(names) == len(set(names))
    assert all(target_for_sm(t.sm) is t for t in TARGETS.values())


@pytest.mark.skipif(local_device_sm() is not None, reason="this machine has a GPU")
def test_native_needs_a_gpu():
    with pytest.raises(Gemma4CompileError, match="needs a CUDA GPU"):
        resolve_target("native")


@pytest.mark.rtx
def test_rtx_flavour_reads_its_sms_from_the_module():
    rtx = load_trt(RTX)
    assert rtx.name == "tensorrt_rtx" and rtx.version == rtx.module.__version__
    assert {80, 86, 89, 120}.issubset(rtx.aot_sms)
    assert 90 not in rtx.aot_sms and 100 not in rtx.aot_sms  # no data-center SMs in TensorRT-RTX
    assert rtx.buildable_sms(None) == rtx.aot_sms  # AOT: no GPU needed
    assert not rtx.has_timing_cache


@pytest.mark.rtx
@pytest.mark.skipif(local_device_sm() == 90, reason="an sm90 GPU with full TensorRT could build it")
def test_sm90_with_only_rtx_is_a_one_line_error():
    flavours = (load_trt(RTX),)
    with pytest.raises(BuildError) as info:
        choose_flavour(resolve_target("h200"), flavours, None)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot build sm90 (h100, h200")
    assert "builds only sm75, sm80, sm86, sm89, sm120" in message
    assert "full TensorRT" in message


@pytest.mark.rtx
def test_plan_fails_before_building_anything():
    with pytest.raises(BuildError, match="cannot build sm100"):
        plan_builds(["sm89", "b200"], flavour=RTX)
    plan = plan_builds(["sm89", "l40s", "rtx5090"], flavour=RTX)  # l40s is sm89: built once
    assert [(t.name, f.name) for t, f in plan] == [("sm89", RTX), ("sm120", RTX)]


def test_unknown_flavour_and_empty_target_list():
    with pytest.raises(BuildError, match="unknown TensorRT flavour 'tensorrt_llm'"):
        load_trt("tensorrt_llm")
    with pytest.raises(BuildError, match="no target given"):
        plan_builds([])


@pytest.mark.rtx
def test_list_targets_says_who_builds_what():
    rows = {row.target.name: row for row in list_targets()}
    assert rows["sm89"].builder.startswith("TensorRT-RTX")
    assert rows["sm100"].builder is None or local_device_sm() == 100
    assert rows["sm100"].reason is None or "cannot build sm100" in rows["sm100"].reason
